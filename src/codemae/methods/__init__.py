"""Pretraining methods: each a module whose forward takes a batch and returns named losses."""

from __future__ import annotations

from pathlib import Path

from codemae.config import Config, from_dict, validate
from codemae.errors import DataError
from codemae.methods.base import PretrainMethod
from codemae.methods.codemae import CoDeMAE
from codemae.methods.fusmae import FusMAE
from codemae.methods.mae import JointMAE
from codemae.models.build import build_encoder

METHODS = {"mae": JointMAE, "codemae": CoDeMAE, "fusmae": FusMAE}


def build_method(cfg: Config) -> PretrainMethod:
    """The configured method around a freshly initialised encoder (no teacher attached)."""
    return METHODS[cfg.method.name](build_encoder(cfg.model, cfg.method.encoder), cfg.method)


def load_method(checkpoint: str | Path, drop_path: float | None = None) -> PretrainMethod:
    """Rebuild the method a checkpoint was trained with and load its weights (eval mode).

    Evaluation and teachers use this on any method's checkpoint; the config comes
    from the checkpoint itself and is validated like a user's config; ``drop_path``
    overrides its stochastic-depth rate (fine-tuning).
    """
    return method_from_state(read_method_checkpoint(checkpoint), str(checkpoint), drop_path)


def read_method_checkpoint(checkpoint: str | Path) -> dict:
    """A checkpoint's contents (``weights_only``), checked to hold a config and model weights."""
    from codemae.train.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    if "config" not in state or "model" not in state:
        raise DataError(f"checkpoint {checkpoint} is not a codemae checkpoint (no 'config' or 'model' entry)")
    return state


def method_from_state(state: dict, where: str, drop_path: float | None = None) -> PretrainMethod:
    """The method of a checkpoint's config with its weights loaded, in eval mode."""
    method = method_from_config(state["config"], drop_path)
    try:
        method.load_state_dict(state["model"])
    except RuntimeError as err:
        raise DataError(f"checkpoint {where}: weights do not match its config: {str(err).splitlines()[0]}") from err
    return method.eval()


def method_from_config(raw: dict, drop_path: float | None = None) -> PretrainMethod:
    """A freshly built method from a stored (plain-data) config, validated like a user's."""
    cfg = from_dict(Config, raw)
    if drop_path is not None:
        cfg.model.drop_path = drop_path
    validate(cfg)
    return build_method(cfg)
