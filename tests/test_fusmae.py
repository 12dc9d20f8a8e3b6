"""Fus-MAE: independent masking, fusion paths of XAD vs XAE&D, single-modality encoding."""

import pytest
import torch

from codemae.batch import make_batch
from codemae.config import to_dict
from codemae.errors import ConfigError
from codemae.eval.segmentation import Segmenter
from codemae.loading import load_method
from codemae.masking import modality_masks
from codemae.methods import build_method
from codemae.methods.fusmae import FusMAE
from codemae.train.engine import check_pairing

from conftest import tiny_config

VIT = {"backbone": "vit_tiny", "embed_dim": 32, "num_heads": 2, "depth": 3}


def make(tmp_path, **method) -> FusMAE:
    torch.manual_seed(0)
    return build_method(tiny_config(tmp_path, model=VIT, method={"name": "fusmae", **method})).eval()


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"opt": torch.randn(2, 3, 32, 32, generator=g), "sar": torch.randn(2, 1, 32, 32, generator=g)}


def test_independent_masks_differ_and_counts_may_differ():
    g = torch.Generator().manual_seed(0)
    masks = modality_masks(["opt", "sar"], 8, 64, {"opt": 0.75, "sar": 0.5}, "independent", generator=g)
    assert masks["opt"].ids_keep.shape == (8, 16) and masks["sar"].ids_keep.shape == (8, 32)
    with pytest.raises(ValueError, match="one mask ratio"):
        modality_masks(["opt", "sar"], 8, 64, {"opt": 0.75, "sar": 0.5}, "consistent")


@pytest.mark.parametrize("fusion", ["xad", "xaed"])
def test_runs_with_unequal_visible_counts_and_every_parameter_learns(tmp_path, fusion):
    model = make(tmp_path, fusion=fusion, masking="independent", sar_mask_ratio=0.5).train()
    loss = model(make_batch(**images()))["recon"]
    loss.backward()
    assert torch.isfinite(loss)
    assert not [n for n, p in model.named_parameters() if p.grad is None]


@pytest.mark.parametrize("fusion", ["xad", "xaed"])
def test_loss_ignores_visible_patches(tmp_path, fusion):
    """Changing a target patch that is visible leaves the loss unchanged (the encoder input is
    held fixed by giving the model the same images; only the target differs)."""
    model = make(tmp_path, fusion=fusion, masking="independent")
    x = images()
    torch.manual_seed(3)
    masks = modality_masks(["opt", "sar"], 2, 4, model.cfg.mask_ratios, "independent")
    visible_patch = int(masks["sar"].ids_keep[0, 0])
    masked_patch = int((masks["sar"].mask[0] == 1).nonzero()[0])

    def loss_with_target(sar_target):
        from codemae.losses import masked_mean, patch_errors, patchify

        latents = model.encoder(x, {m: masks[m].ids_keep for m in x})
        z = {m: model.decoder_embed(latents[m].levels) for m in x}
        fused = model.decoder_fusion["sar"](z["sar"], z["opt"])
        pred = model.decoders["sar"]({"sar": (fused, masks["sar"].ids_restore)})["sar"]
        return masked_mean([patch_errors(pred, patchify(sar_target, 16))], [masks["sar"].mask])

    base = loss_with_target(x["sar"])
    for patch, same in ((visible_patch, True), (masked_patch, False)):
        target = x["sar"].clone()
        r, c = divmod(patch, 2)
        target[0, :, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] += torch.randn(1, 16, 16)
        assert torch.equal(loss_with_target(target), base) == same


def test_xad_encoder_has_no_cross_modal_path_and_xaed_has(tmp_path):
    for fusion, crosses in (("xad", False), ("xaed", True)):
        model = make(tmp_path, fusion=fusion)
        x = images()
        changed = {**x, "sar": x["sar"] + 1.0}
        opt_before = model.encode(x)["opt"]
        opt_after = model.encode(changed)["opt"]
        assert torch.equal(opt_before, opt_after) != crosses, fusion


@pytest.mark.parametrize("fusion", ["xad", "xaed"])
def test_single_modality_encoding(tmp_path, fusion):
    """A missing modality contributes no cross-attention: optical-only encoding works and,
    for XAE&D, differs from the fused encoding."""
    model = make(tmp_path, fusion=fusion)
    x = images()
    alone = model.encode({"opt": x["opt"]})
    assert set(alone) == {"opt"} and alone["opt"].shape == (2, 4, 32)
    fused = model.encode(x)["opt"]
    assert torch.equal(alone["opt"], fused) == (fusion == "xad")
    assert model.encode({"sar": x["sar"]})["sar"].shape == (2, 4, 32)


def test_fusmae_needs_a_vit_and_paired_data(tmp_path):
    with pytest.raises(ConfigError, match="ViT"):
        build_method(tiny_config(tmp_path, method={"name": "fusmae"}))
    method = make(tmp_path)
    assert method.needs_pairs and not build_method(tiny_config(tmp_path)).needs_pairs
    check_pairing(method, {"paired"})
    with pytest.raises(ConfigError, match="paired sources only"):
        check_pairing(method, {"paired", "sar"})


def test_xaed_segmentation_runs_the_fusion_block(tmp_path):
    """Segmentation reads the encoder's levels through the evaluation contract, so XAE&D's fusion
    block and CLS token take part: changing either changes the segmenter's output (before the fusion
    encoder became a model of its own, segmentation called the bare ViT and ignored both)."""
    method = make(tmp_path, fusion="xaed")
    segmenter = Segmenter(method, ("opt", "sar"), num_classes=3, train_encoder=False).eval()
    x = images()
    with torch.no_grad():
        before = segmenter(x)
        for name, param in (("fusion", method.encoder.fusion.mlp.mlp.fc2.weight),
                            ("cls_token", method.encoder.cls_token)):
            saved = param.detach().clone()
            param.add_(torch.randn_like(param))  # random, not uniform: a uniform shift the final LayerNorm removes
            assert not torch.allclose(segmenter(x), before), name
            param.copy_(saved)
        assert torch.equal(segmenter(x), before)
        tokens = method.encode(x)
        levels = method.encode_outputs(x)
    assert all(torch.equal(levels[m].levels[0], tokens[m]) for m in x)


def test_fusion_encoder_layer_ids_and_export_need_no_special_case(tmp_path):
    method = make(tmp_path, fusion="xaed")
    encoder = method.encoder
    assert encoder.num_layers == 4  # depth 3 (fusion + 2 blocks) + 1
    ids = {name: encoder.layer_id(name) for name, _ in encoder.named_parameters()}
    assert ids["cls_token"] == 0 and ids["patch_embed.opt.weight"] == 0 and ids["pos_embed"] == 0
    assert {ids[n] for n in ids if n.startswith("fusion.")} == {1}
    assert ids["blocks.0.attn.qkv.weight"] == 2 and ids["blocks.1.attn.qkv.weight"] == 3
    assert ids["norm.weight"] == 4
    assert "cls_token" in encoder.no_weight_decay()
    assert {k for k in method.state_dict() if not k.startswith(("encoder.", "decoder"))} == set()


def test_checkpoint_of_the_earlier_fusmae_layout_loads(tmp_path):
    """Layout 1 Fus-MAE checkpoints (fusion block under ``encoder_fusion.``, CLS token at the top level,
    separate q and kv projections in self-attention, no ``layout`` entry) load, converted, to
    identical weights."""
    method = make(tmp_path, fusion="xaed")
    renames = {"encoder.fusion.": "encoder_fusion.", "encoder.cls_token": "cls_token"}
    old = {}
    for key, value in method.state_dict().items():
        for new, earlier in renames.items():
            if key.startswith(new):
                key = earlier + key[len(new):]
        if ".attn.qkv." in key:
            q, kv = value.split([value.shape[0] // 3, 2 * value.shape[0] // 3])
            old[key.replace(".qkv.", ".q.")], old[key.replace(".qkv.", ".kv.")] = q, kv
            continue
        old[key] = value
    assert any(k.startswith("encoder_fusion.") for k in old) and "encoder.blocks.0.attn.kv.weight" in old
    path = tmp_path / "old.pt"
    torch.save({"model": old, "config": to_dict(tiny_config(tmp_path, model=VIT, method={"name": "fusmae"}))}, path)
    loaded = load_method(path)
    x = images()
    assert torch.equal(loaded.encode(x)["opt"], method.encode(x)["opt"])
