import pytest
import torch

from codemae.config import ModelConfig
from codemae.errors import ConfigError
from codemae.models.build import BACKBONES, build_backbone
from codemae.models.pos_embed import resize_pos_embed, sincos_2d

EXPECTED = {  # (embed dim, pyramid level dims)
    "vit_tiny": (192, [192]), "vit_small": (384, [384]), "vit_base": (768, [768]),
    "hivit_tiny": (384, [192, 768, 3072]), "hivit_small": (384, [192, 768, 3072]),
    "hivit_base": (512, [256, 1024, 4096]), "hivit_large": (768, [384, 1536, 6144]),
}


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_size_shapes(name):
    """Full-size models are built on the meta device: shapes without memory or time."""
    device = "cpu" if name in ("vit_tiny", "hivit_tiny") else "meta"
    with torch.device(device):
        model = build_backbone(ModelConfig(backbone=name, img_size=64, sar_channels=2))
        images = {"opt": torch.randn(2, 3, 64, 64), "sar": torch.randn(2, 2, 64, 64)}
        keep = torch.tensor([[0, 5, 9, 15], [1, 2, 3, 4]])
        out = model(images, {"opt": keep, "sar": keep}, return_blocks=(1,))
    dim, levels = EXPECTED[name]
    for m in ("opt", "sar"):
        assert out[m].tokens.shape == (2, 4, dim)
        assert [lv.shape for lv in out[m].levels] == [(2, 4, d) for d in levels]
        assert out[m].hidden[1].shape == (2, 4, dim)


@pytest.mark.parametrize("sar_channels", [1, 2, 3])
def test_sar_channel_counts(sar_channels):
    model = build_backbone(ModelConfig(backbone="vit_tiny", img_size=32, depth=1, sar_channels=sar_channels))
    out = model({"sar": torch.randn(1, sar_channels, 32, 32)})
    assert out["sar"].tokens.shape == (1, 4, 192) and "opt" not in out


def test_joint_batch_equals_separate_runs():
    """Concatenating modalities on the batch axis (as the paper does) changes nothing."""
    torch.manual_seed(0)
    model = build_backbone(ModelConfig(backbone="hivit_tiny", img_size=32, embed_dim=32, depth=2, num_heads=2)).eval()
    images = {"opt": torch.randn(2, 3, 32, 32), "sar": torch.randn(2, 1, 32, 32)}
    keep = {"opt": torch.tensor([[0, 2], [1, 3]]), "sar": torch.tensor([[1, 2], [0, 3]])}
    joint = model(images, keep)
    for m in images:
        alone = model({m: images[m]}, {m: keep[m]})[m]
        torch.testing.assert_close(joint[m].tokens, alone.tokens, rtol=1e-5, atol=1e-5)
        for a, b in zip(joint[m].levels, alone.levels):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_masked_tokens_equal_full_encoding_for_mlp_stages():
    """HiViT's MLP stages act within each patch: masking a patch never changes another's early features."""
    torch.manual_seed(0)
    model = build_backbone(ModelConfig(backbone="hivit_tiny", img_size=32, embed_dim=32, depth=0, num_heads=2)).eval()
    x = {"opt": torch.randn(1, 3, 32, 32)}
    full = model(x)["opt"].tokens
    part = model(x, {"opt": torch.tensor([[1, 3]])})["opt"].tokens
    torch.testing.assert_close(part, full[:, [1, 3]], rtol=1e-5, atol=1e-5)


def test_position_embedding_interpolates_to_other_sizes():
    model = build_backbone(ModelConfig(backbone="vit_tiny", img_size=32, depth=1))
    assert model({"opt": torch.randn(1, 3, 64, 64)})["opt"].tokens.shape == (1, 16, 192)
    pos = sincos_2d(8, 4).unsqueeze(0)
    assert torch.equal(resize_pos_embed(pos, 16), pos)
    assert resize_pos_embed(pos, 64).shape == (1, 64, 8)


def test_sincos_is_mae_layout():
    pos = sincos_2d(8, 3)
    # first half encodes the column, second half the row: row 0 col 0 has sin 0 / cos 1
    assert torch.allclose(pos[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))
    assert torch.equal(pos[1, 4:], pos[0, 4:])  # same row -> same row half


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="model.backbone"):
        build_backbone(ModelConfig(backbone="resnet50"))
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        build_backbone(ModelConfig(backbone="vit_tiny", img_size=50))
