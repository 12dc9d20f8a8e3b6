"""Frozen OKD teachers, loaded from local files only.

A teacher maps optical images in [0, 1] to a grid of patch features
(B, D, h, w). It normalises its own input (DINOv3-Sat mean/std by default), runs
in eval mode without gradient, and is never part of a method's state dict.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codemae.config import TeacherConfig
from codemae.errors import ConfigError, DataError


class Teacher(nn.Module):
    """Base class: subclasses implement :meth:`patch_tokens` on normalised input."""

    dim: int
    patch_size: int

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        self.input_size = cfg.input_size
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)

    def patch_tokens(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised -> (B, H/p * W/p, D) patch tokens in row-major order."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, unit_images: Tensor) -> Tensor:
        """[0, 1] optical images (B, 3, H, W) -> feature grid (B, D, H/p, W/p)."""
        x = unit_images
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        x = (x - self.mean) / self.std
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.patch_tokens(x)
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w).float()

    def freeze(self) -> Teacher:
        self.eval()
        self.requires_grad_(False)
        return self


class HFTeacher(Teacher):
    """A Hugging Face-format local directory (e.g. ``facebook/dinov3-vitl16-pretrain-sat493m``).

    Output sequence is [cls, registers, patches]; patches start after the registers.
    """

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__(cfg)
        try:
            from transformers import AutoModel
        except ImportError as err:
            raise ConfigError("method.teacher.kind=hf needs transformers: pip install 'codemae[teacher]'") from err
        if not Path(cfg.path).is_dir():
            raise DataError(f"teacher directory {cfg.path} not found (method.teacher.path)")
        try:
            self.model = AutoModel.from_pretrained(cfg.path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise DataError(f"teacher directory {cfg.path} is not a loadable model: {str(err).splitlines()[0]}") from err
        config = self.model.config
        self.skip = 1 + getattr(config, "num_register_tokens", 0)
        self.dim = config.hidden_size
        patch = config.patch_size
        self.patch_size = patch if isinstance(patch, int) else patch[0]

    def patch_tokens(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, self.skip :]


class HubTeacher(Teacher):
    """A local clone of the DINOv3 repository plus a weights file, via ``torch.hub.load(source='local')``."""

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__(cfg)
        if not (Path(cfg.path) / "hubconf.py").is_file():
            raise DataError(f"teacher repository {cfg.path} has no hubconf.py (method.teacher.path)")
        if not Path(cfg.weights).is_file():
            raise DataError(f"teacher weights {cfg.weights or '(empty)'} not found (method.teacher.weights); "
                            "weights are never downloaded")
        self.model = torch.hub.load(cfg.path, cfg.hub_model, source="local", weights=cfg.weights)
        self.dim = self.model.embed_dim
        self.patch_size = self.model.patch_size

    def patch_tokens(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)["x_norm_patchtokens"]


TEACHERS: dict[str, type[Teacher]] = {"hf": HFTeacher, "hub": HubTeacher}  # "checkpoint": codemae.loading


def to_student_grid(grid: Tensor, size: int) -> Tensor:
    """Resample a feature grid (B, D, h, w) to ``size x size`` and flatten to tokens (B, size*size, D)."""
    if grid.shape[-2:] != (size, size):
        grid = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=grid.shape[-1] > size)
    return grid.flatten(2).transpose(1, 2)
