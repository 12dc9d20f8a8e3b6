"""Cross-modal degraded reconstruction (CDR) targets, computed from the normalised optical input.

Each target turns the optical image (B, 3, H, W) into per-patch vectors (B, N, K):
``gray`` (the paper's choice: 0.299 R + 0.587 G + 0.114 B), ``rgb`` (the
completeness-driven full target), ``spatial`` (16x16 average pool, upsampled),
``hog`` (9-bin histograms of oriented gradients on 8x8 cells) and ``mgf``
(multi-scale gradient magnitudes, kernels 9/13/17).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from codemae.losses import patchify

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
HOG_CELL, HOG_BINS = 8, 9
MGF_KERNELS = (9, 13, 17)


def grayscale(opt: Tensor) -> Tensor:
    w = torch.tensor(GRAY_WEIGHTS, dtype=opt.dtype, device=opt.device).view(1, 3, 1, 1)
    return (opt * w).sum(1, keepdim=True)


def spatially_degraded(opt: Tensor, patch: int) -> Tensor:
    return F.interpolate(F.avg_pool2d(opt, patch), scale_factor=patch, mode="nearest")


def image_gradients(gray: Tensor) -> tuple[Tensor, Tensor]:
    """Central differences [-1, 0, 1] with replicated borders."""
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]
    gy = padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]
    return gx, gy


def hog_cells(gray: Tensor, cell: int = HOG_CELL, bins: int = HOG_BINS) -> Tensor:
    """Unsigned-orientation gradient histograms per ``cell x cell`` block, L2-normalised: (B, bins, H/cell, W/cell)."""
    gx, gy = image_gradients(gray)
    magnitude = torch.sqrt(gx**2 + gy**2)
    angle = torch.atan2(gy, gx) % math.pi
    index = (angle / (math.pi / bins)).long().clamp(max=bins - 1)
    votes = F.one_hot(index[:, 0], bins).permute(0, 3, 1, 2).to(gray.dtype) * magnitude
    hist = F.avg_pool2d(votes, cell)
    return hist / (hist.norm(dim=1, keepdim=True) + 1e-6)


def multiscale_gradients(gray: Tensor, kernels: tuple[int, ...] = MGF_KERNELS) -> Tensor:
    """Gradient magnitude at several scales: the difference of the mean of the two half
    windows of a k x k neighbourhood, along x and along y. One channel per kernel size."""
    scales = []
    for k in kernels:
        half = k // 2
        kernel = torch.zeros(k, k, dtype=gray.dtype, device=gray.device)
        kernel[:, half + 1 :] = 1.0 / (k * half)
        kernel[:, :half] = -1.0 / (k * half)
        padded = F.pad(gray, (half,) * 4, mode="replicate")
        gx = F.conv2d(padded, kernel.view(1, 1, k, k))
        gy = F.conv2d(padded, kernel.T.contiguous().view(1, 1, k, k))
        scales.append(torch.sqrt(gx**2 + gy**2 + 1e-12))
    return torch.cat(scales, dim=1)


@dataclass(frozen=True)
class CDRTarget:
    """A target: the degraded image computed from the optical input, the patch size its
    vectors are cut with (``cell`` input pixels per target pixel: HOG has one per 8x8 cell),
    their length, whether the loss normalises each target patch (norm-pix; the spatial
    target is constant within a patch, so norm-pix would erase it) and whether it is a
    picture worth showing in the analysis report."""

    image: Callable[[Tensor, int], Tensor]
    channels: int
    cell: int = 1
    norm_pix: bool = True
    pictured: bool = False

    def compute(self, opt: Tensor, patch: int) -> Tensor:
        """Per-patch target vectors (B, N, length(patch))."""
        return patchify(self.image(opt, patch), patch // self.cell)

    def length(self, patch: int) -> int:
        return (patch // self.cell) ** 2 * self.channels


CDR_TARGETS: dict[str, CDRTarget] = {
    "gray": CDRTarget(lambda opt, p: grayscale(opt), 1, pictured=True),
    "rgb": CDRTarget(lambda opt, p: opt, 3, pictured=True),
    "spatial": CDRTarget(spatially_degraded, 3, norm_pix=False, pictured=True),
    "hog": CDRTarget(lambda opt, p: hog_cells(grayscale(opt)), HOG_BINS, cell=HOG_CELL),
    "mgf": CDRTarget(lambda opt, p: multiscale_gradients(grayscale(opt)), len(MGF_KERNELS)),
}
