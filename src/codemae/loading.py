"""From files to modules: checkpoints to methods, teacher settings to frozen teachers.

Sits above Methods and Models (it builds both) and below Train, Eval and the CLI.
Every checkpoint read goes through :func:`read_method_checkpoint`, which refuses
pickled code and brings checkpoints of earlier codemae layouts up to date.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from codemae.checkpoint import LAYOUT, check_entries, load_checkpoint
from codemae.config import Config, MethodConfig, TeacherConfig, from_dict, validate
from codemae.data.pipeline import TeacherFeatures
from codemae.data.teacher_cache import TeacherFeatureCache
from codemae.errors import ConfigError, DataError
from codemae.methods import METHODS, PretrainMethod, build_method
from codemae.models.backbone import Encoder
from codemae.models.teacher import TEACHERS, Teacher
from codemae.models.vit import VIT_SIZES

log = logging.getLogger("codemae")

# layout 1 Fus-MAE: its fusion block and CLS token sat beside the encoder
FUSMAE_RENAMES = (("encoder_fusion.", "encoder.fusion."), ("cls_token", "encoder.cls_token"))


def load_method(checkpoint: str | Path, drop_path: float | None = None) -> PretrainMethod:
    """Rebuild the method a checkpoint was trained with and load its weights (eval mode).

    The config comes from the checkpoint itself and is validated like a user's;
    ``drop_path`` overrides its stochastic-depth rate (fine-tuning).
    """
    return method_from_state(read_method_checkpoint(checkpoint), str(checkpoint), drop_path)


def read_method_checkpoint(checkpoint: str | Path) -> dict:
    """A checkpoint's contents (``weights_only``), checked to hold a config and model weights,
    brought to the current layout."""
    state = load_checkpoint(checkpoint)
    check_entries(state, checkpoint, "model", "config")
    state["model"], state["config"] = upgrade(state["model"], state["config"], state.get("layout", 1), str(checkpoint))
    return state


def upgrade(weights: dict[str, Tensor], config: dict, layout: int, where: str) -> tuple[dict[str, Tensor], dict]:
    """Weights and config of an earlier layout (see :data:`codemae.checkpoint.LAYOUT`) in the current one.

    Layout 1 ViT checkpoints (joint MAE, CoDe-MAE, Fus-MAE) convert exactly: self-attention's separate
    q and kv projections become one qkv, Fus-MAE's fusion block and CLS token move into its encoder,
    the decoder embedding moves under its decoder's name, and the OKD tap keeps its block. Layout 1
    HiViT checkpoints cannot: their pyramid and decoder embedding have no counterpart in the
    published structure.
    """
    if layout >= LAYOUT:
        return weights, config
    model = config.get("model", {})
    if not str(model.get("backbone", "hivit_tiny")).startswith("vit_"):
        raise DataError(f"checkpoint {where} was written before codemae took the published HiViT/iTPN layout "
                        f"(layout {layout}): its pyramid and decoder embedding have no exact counterpart now, so it "
                        "cannot be converted; retrain it, or evaluate it with the codemae release that wrote it")
    method = config.get("method", {})
    out = {}
    for key, value in weights.items():
        for old, new in FUSMAE_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    for key in [k for k in out if k.endswith((".attn.q.weight", ".attn.q.bias"))]:
        owner, _, leaf = key.rpartition(".attn.q.")
        if f"{owner}.norm_q.weight" in out:  # a cross-attention: keeps q and kv
            continue
        out[f"{owner}.attn.qkv.{leaf}"] = torch.cat([out.pop(key), out.pop(f"{owner}.attn.kv.{leaf}")])
    if method.get("name", "mae") != "fusmae":
        groups = ["shared"] if method.get("decoder", "shared") == "shared" else ["opt", "sar"]
        for key in [k for k in out if k.startswith("decoder_embed.")]:
            value = out.pop(key)
            for group in groups:
                out[f"decoder_embed.{group}.{key.removeprefix('decoder_embed.')}"] = value
    config = {**config, "method": dict(method)}
    if method.get("okd") and method.get("okd_aux_block") is None:
        depth = model.get("depth") or VIT_SIZES[model["backbone"].removeprefix("vit_")]["depth"]
        config["method"]["okd_aux_block"] = (3 * depth) // 4 - 1  # where layout 1 tapped
    log.info("checkpoint %s: layout %d weights converted to layout %d", where, layout, LAYOUT)
    return out, config


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
    return build_method(config_from_dict(raw, drop_path))


def encoder_from_config(raw: dict) -> Encoder:
    """The encoder alone (no decoders, no heads) of a stored config's method, freshly built."""
    cfg = config_from_dict(raw)
    return METHODS[cfg.method.name].build_encoder(cfg)


def config_from_dict(raw: dict, drop_path: float | None = None) -> Config:
    """A stored (plain-data) config, validated like a user's; ``drop_path`` overrides the model's."""
    cfg = from_dict(Config, raw)
    if drop_path is not None:
        cfg.model.drop_path = drop_path
    validate(cfg)
    return cfg


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
    teacher = build_teacher(cfg.teacher)
    if teacher is None:
        raise ConfigError("config key 'method.teacher.kind': method.okd is on but there is no teacher: set "
                          "method.teacher.kind and path, or method.teacher.cache")
    method.attach_teacher(teacher.to(device))
    log.info("teacher: %s from %s (%d-d features, live)", cfg.teacher.kind, cfg.teacher.path, teacher.dim)
    return None
