import torch

from codemae.batch import make_batch
from codemae.losses import masked_mean, patch_errors, patchify, unpatchify
from codemae.methods import build_method

from conftest import tiny_config


def test_patchify_roundtrip_and_order():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    assert torch.equal(unpatchify(p, 4, 3), x)
    # patch 1 is the top-right 4x4 block; its first vector entries are pixel (0, 4) channels 0..2
    assert p[0, 1, :3].tolist() == [x[0, c, 0, 4].item() for c in range(3)]


def test_norm_pix_mse_hand_computed():
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])  # two patches of 2 values
    pred = torch.zeros(1, 2, 2)
    mask = torch.tensor([[1.0, 0.0]])
    # patch 0 normalised: mean 2, unbiased var 2 -> [-1/sqrt(2), 1/sqrt(2)] (eps negligible); mse = 0.5
    assert torch.allclose(masked_mean([patch_errors(pred, target)], [mask]), torch.tensor(0.5), atol=1e-5)
    assert torch.allclose(patch_errors(pred, target, norm_pix=False), torch.tensor([[5.0, 4.0]]))


def test_mae_loss_ignores_visible_patches(tmp_path):
    """Changing the pixels of a visible patch in the target leaves the loss unchanged; a masked one changes it."""
    torch.manual_seed(0)
    model = build_method(tiny_config(tmp_path)).eval()
    images = {"opt": torch.randn(2, 3, 32, 32), "sar": torch.randn(2, 1, 32, 32)}
    torch.manual_seed(1)
    visible = model.embed_visible(images)
    base = model.reconstruction(images, visible)
    mask = visible["opt"].mask.mask
    vis_patch, masked_patch = int((mask[0] == 0).nonzero()[0]), int((mask[0] == 1).nonzero()[0])

    def perturbed(patch: int) -> dict:
        out = {k: v.clone() for k, v in images.items()}
        r, c = divmod(patch, 2)
        out["opt"][0, :, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] += torch.randn(3, 16, 16)
        return out

    # the encoder input is held fixed (same visible tokens): only the target differs
    assert torch.equal(model.reconstruction(perturbed(vis_patch), visible), base)
    assert not torch.equal(model.reconstruction(perturbed(masked_patch), visible), base)


def test_every_parameter_gets_a_gradient(tmp_path):
    for decoder in ("shared", "independent"):
        model = build_method(tiny_config(tmp_path, method={"decoder": decoder}))
        batch = make_batch(torch.randn(2, 3, 32, 32), torch.randn(2, 1, 32, 32))
        model(batch)["recon"].backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, missing
    assert set(model.decoders) == {"opt", "sar"}


def test_shared_decoder_shares_head_when_channels_match(tmp_path):
    one = build_method(tiny_config(tmp_path))
    three = build_method(tiny_config(tmp_path, model={"sar_channels": 3}))
    assert set(one.decoders["shared"].heads) == {str(16 * 16 * 3), str(16 * 16)}
    assert set(three.decoders["shared"].heads) == {str(16 * 16 * 3)}


def test_encode_api_single_and_both(tmp_path):
    model = build_method(tiny_config(tmp_path)).eval()
    opt, sar = torch.randn(2, 3, 32, 32), torch.randn(2, 1, 32, 32)
    assert set(model.encode({"opt": opt})) == {"opt"}
    both = model.encode({"opt": opt, "sar": sar})
    assert both["sar"].shape == (2, 4, 32)
    torch.testing.assert_close(both["sar"], model.encode({"sar": sar})["sar"], rtol=1e-5, atol=1e-5)
