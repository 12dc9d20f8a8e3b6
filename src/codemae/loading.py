"""From files to modules: checkpoints to methods, teacher settings to frozen teachers.

Sits above Methods and Models (it builds both) and below Train, Eval and the CLI.
Every checkpoint read goes through :func:`read_method_checkpoint`, which refuses
pickled code and brings checkpoints of earlier codemae layouts up to date.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from codemae.checkpoint import load_checkpoint
from codemae.config import Config, MethodConfig, TeacherConfig, from_dict, validate
from codemae.data.sources import Source
from codemae.data.teacher_cache import TeacherFeatureCache
from codemae.errors import ConfigError, DataError
from codemae.methods import PretrainMethod, build_method
from codemae.models.teacher import TEACHERS, Teacher

log = logging.getLogger("codemae")

TeacherFeatures = Callable[[Source], "TeacherFeatureCache | None"]
# renames of the Fus-MAE layout before its encoder became a model of its own (codemae 0.1.0, step <= 11)
FUSMAE_RENAMES = (("encoder_fusion.", "encoder.fusion."), ("cls_token", "encoder.cls_token"))


def load_method(checkpoint: str | Path, drop_path: float | None = None) -> PretrainMethod:
    """Rebuild the method a checkpoint was trained with and load its weights (eval mode).

    The config comes from the checkpoint itself and is validated like a user's;
    ``drop_path`` overrides its stochastic-depth rate (fine-tuning).
    """
    return method_from_state(read_method_checkpoint(checkpoint), str(checkpoint), drop_path)


def read_method_checkpoint(checkpoint: str | Path) -> dict:
    """A checkpoint's contents (``weights_only``), checked to hold a config and model weights,
    its weights renamed to the current layout."""
    state = load_checkpoint(checkpoint)
    if "config" not in state or "model" not in state:
        raise DataError(f"checkpoint {checkpoint} is not a codemae checkpoint (no 'config' or 'model' entry)")
    state["model"] = upgrade_weights(state["model"], str(checkpoint))
    return state


def upgrade_weights(weights: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """Weights of an earlier layout renamed to the current one (a no-op for current checkpoints)."""
    if not any(k.startswith(("encoder_fusion.", "cls_token")) for k in weights):
        return weights
    log.info("checkpoint %s: Fus-MAE weights of the earlier layout renamed (encoder_fusion -> encoder.fusion)", where)
    renamed = {}
    for key, value in weights.items():
        for old, new in FUSMAE_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed


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


class CheckpointTeacher(Teacher):
    """The optical encoder of any codemae checkpoint."""

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__(cfg)
        self.method = load_method(cfg.path)
        self.dim = self.method.encoder.embed_dim
        self.patch_size = self.method.encoder.patch_size

    def patch_tokens(self, x: Tensor) -> Tensor:
        return self.method.encode({"opt": x})["opt"]


def build_teacher(cfg: TeacherConfig) -> Teacher | None:
    """The configured frozen teacher, or None for ``kind: none``."""
    if cfg.kind == "none":
        return None
    if not cfg.path:
        raise ConfigError(f"config key 'method.teacher.path': required for teacher kind '{cfg.kind}'")
    kinds = TEACHERS | {"checkpoint": CheckpointTeacher}
    teacher = kinds[cfg.kind](cfg).freeze()
    if teacher.dim != cfg.dim:
        raise ConfigError(f"config key 'method.teacher.dim': {cfg.dim}, but the teacher's features are {teacher.dim}-d")
    return teacher


def cached_teacher_features(directory: str | Path) -> TeacherFeatures:
    """The reader of each source's cached teacher features in ``directory`` (optical sources only)."""
    return lambda source: TeacherFeatureCache(directory, source) if "opt" in source.modalities else None


def prepare_teacher(method: PretrainMethod, cfg: MethodConfig, device: torch.device) -> TeacherFeatures | None:
    """Give a method that learns from a teacher its targets: a live frozen teacher attached to
    it, or (teacher cache set) the per-source feature reader the data pipeline hands out."""
    if not method.uses_teacher:
        return None
    if cfg.teacher.cache:
        log.info("teacher targets read from the teacher cache %s", cfg.teacher.cache)
        return cached_teacher_features(cfg.teacher.cache)
    teacher = build_teacher(cfg.teacher)  # validate() makes sure one is configured
    if teacher is None:
        return None  # built without validate(): the method's first step names what is missing
    method.attach_teacher(teacher.to(device))
    log.info("teacher: %s from %s (%d-d features, live)", cfg.teacher.kind, cfg.teacher.path, teacher.dim)
    return None
