"""Pretraining methods: each a module whose forward takes a batch and returns named losses."""

from __future__ import annotations

from codemae.config import Config
from codemae.methods.base import PretrainMethod
from codemae.methods.mae import JointMAE
from codemae.models.build import build_backbone


def build_method(cfg: Config) -> PretrainMethod:
    """The configured method around a freshly initialised backbone."""
    encoder = build_backbone(cfg.model)
    return {"mae": JointMAE}[cfg.method.name](encoder, cfg.method)
