"""Build a backbone from the ``model`` config section."""

from __future__ import annotations

from codemae.config import ModelConfig
from codemae.errors import ConfigError
from codemae.models.backbone import MODALITIES, Backbone, PerModalityBackbones
from codemae.models.hivit import HIVIT_SIZES, HiViT
from codemae.models.vit import VIT_SIZES, ViT

BACKBONES = [f"vit_{s}" for s in VIT_SIZES] + [f"hivit_{s}" for s in HIVIT_SIZES]


def build_encoder(cfg: ModelConfig, sharing: str = "shared") -> Backbone | PerModalityBackbones:
    """One backbone shared by both modalities, or (``independent``) one per modality."""
    if sharing == "shared":
        return build_backbone(cfg)
    return PerModalityBackbones({m: build_backbone(cfg, only=m) for m in MODALITIES})


def build_backbone(cfg: ModelConfig, only: str | None = None) -> Backbone:
    """A ViT or HiViT from a preset name (``vit_tiny`` ... ``hivit_large``) plus overrides;
    with ``only``, a patch embedding for that modality alone."""
    family, _, size = cfg.backbone.partition("_")
    presets = {"vit": VIT_SIZES, "hivit": HIVIT_SIZES}.get(family, {})
    if size not in presets:
        raise ConfigError(f"config key 'model.backbone': unknown backbone {cfg.backbone!r}; choose from {', '.join(BACKBONES)}")
    arch = dict(presets[size])
    for key in ("embed_dim", "depth", "num_heads"):
        if getattr(cfg, key) is not None:
            arch[key] = getattr(cfg, key)
    channels = {"opt": cfg.opt_channels, "sar": cfg.sar_channels}
    if only is not None:
        channels = {only: channels[only]}
    common = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, channels=channels, drop_path=cfg.drop_path)
    try:
        if family == "vit":
            return ViT(**common, **arch)
        return HiViT(**common, **arch, pyramid_dim=cfg.pyramid_dim)
    except ValueError as err:
        raise ConfigError(f"config key 'model': {err}") from err
