"""Pretraining methods: each a module whose forward takes a batch and returns named losses."""

from __future__ import annotations

from codemae.config import Config
from codemae.methods.base import PretrainMethod
from codemae.methods.codemae import CoDeMAE
from codemae.methods.fusmae import FusMAE
from codemae.methods.mae import JointMAE

METHODS: dict[str, type[PretrainMethod]] = {"mae": JointMAE, "codemae": CoDeMAE, "fusmae": FusMAE}


def build_method(cfg: Config) -> PretrainMethod:
    """The configured method around a freshly initialised encoder (no teacher attached)."""
    method_cls = METHODS[cfg.method.name]
    return method_cls(method_cls.build_encoder(cfg), cfg.method).init_layers()
