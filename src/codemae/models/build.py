"""Build a backbone from the ``model`` config section."""

from __future__ import annotations

from codemae.batch import MODALITIES
from codemae.config import ModelConfig
from codemae.errors import ConfigError
from codemae.models.backbone import Backbone, PerModalityBackbones
from codemae.models.fusion import FusionViT
from codemae.models.hivit import HIVIT_SIZES, HiViT
from codemae.models.vit import VIT_SIZES, ViT

FAMILIES: dict[str, tuple[type[Backbone], dict[str, dict]]] = {"vit": (ViT, VIT_SIZES), "hivit": (HiViT, HIVIT_SIZES)}
BACKBONES = [f"{family}_{size}" for family, (_, sizes) in FAMILIES.items() for size in sizes]


def build_encoder(cfg: ModelConfig, sharing: str = "shared") -> Backbone | PerModalityBackbones:
    """One backbone shared by both modalities, or (``independent``) one per modality."""
    if sharing == "shared":
        return build_backbone(cfg)
    return PerModalityBackbones({m: build_backbone(cfg, only=m) for m in MODALITIES})


def build_backbone(cfg: ModelConfig, only: str | None = None, family_cls: type[Backbone] | None = None) -> Backbone:
    """A ViT or HiViT from a preset name (``vit_tiny`` ... ``hivit_large``) plus overrides;
    with ``only``, a patch embedding for that modality alone; ``family_cls`` builds a subclass
    of the preset's family instead (the fusion encoder)."""
    family, _, size = cfg.backbone.partition("_")
    cls, presets = FAMILIES.get(family, (None, {}))
    if size not in presets:
        raise ConfigError(f"config key 'model.backbone': unknown backbone {cfg.backbone!r}; choose from {', '.join(BACKBONES)}")
    if family_cls is not None and not issubclass(family_cls, cls):
        raise ConfigError(f"config key 'model.backbone': {family_cls.__name__} needs a {family_cls.__mro__[1].__name__} "
                          f"backbone, not {cfg.backbone!r}")
    arch = dict(presets[size])
    for key in ("embed_dim", "depth", "num_heads"):
        if getattr(cfg, key) is not None:
            arch[key] = getattr(cfg, key)
    if family == "hivit":
        arch |= {"pyramid_dim": cfg.pyramid_dim, "pyramid": cfg.pyramid}
    channels = cfg.channels if only is None else {only: cfg.channels[only]}
    try:
        return (family_cls or cls)(img_size=cfg.img_size, patch_size=cfg.patch_size, channels=channels,
                                   drop_path=cfg.drop_path, pos_interp=cfg.pos_interp, **arch)
    except ValueError as err:
        raise ConfigError(f"config key 'model': {err}") from err


def build_fusion_encoder(cfg: ModelConfig) -> FusionViT:
    """Fus-MAE XAE&D's encoder on a ViT preset."""
    return build_backbone(cfg, family_cls=FusionViT)
