"""Cross-modal degraded reconstruction (CDR) targets (Table IId), as the published code computes them.

A target turns a 3-channel image (B, 3, H, W) into a per-pixel map (B, K, H, W), cut into
per-patch vectors (B, N, p*p*K) with the pixel order of :func:`~codemae.losses.patchify`:

- ``gray`` (the paper's choice): 0.299 R + 0.587 G + 0.114 B of the normalised image.
- ``rgb``: the normalised image itself.
- ``spatial``: each patch's per-channel mean, spread over the patch (norm-pix, applied to every
  target as published, leaves the patch's inter-channel contrast).
- ``hog``: 9-bin histograms of oriented gradients of the [0, 1] luma: Sobel gradients (reflect
  padding), magnitudes weighted by a Gaussian window centred in each patch, summed over cells of
  half a patch, bilinearly spread back to pixels (MaskFeat's recipe, as published).
- ``mgf``: multi-scale gradient features of the [0, 1] luma: the norm of the log-ratios of the
  left/right and top/bottom half-window sums of windows of radius 9, 13 and 17 (+1e-2 against
  log 0), one channel per radius (SARATR-X's recipe, as published).

The SAR-side target (the ``both`` direction: optical tokens predict it) is the same target of the
SAR image made three-channel by :func:`as_rgb` (the published SAR is three equal channels).
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
HOG_BINS = 9
MGF_RADII = (9, 13, 17)
MGF_OFFSET = 1e-2


def grayscale(rgb: Tensor) -> Tensor:
    w = torch.tensor(GRAY_WEIGHTS, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * w).sum(1, keepdim=True)


def as_rgb(image: Tensor) -> Tensor:
    """Three channels: a 3-channel image as is, any other its channel mean repeated three times."""
    return image if image.shape[1] == 3 else image.mean(1, keepdim=True).expand(-1, 3, -1, -1)


def spatially_degraded(rgb: Tensor, patch: int) -> Tensor:
    return F.interpolate(F.avg_pool2d(rgb, patch), scale_factor=patch, mode="nearest")


def gaussian_window(size: int, std: float, device: torch.device) -> Tensor:
    """A ``size x size`` Gaussian (centred, standard deviation ``std``) summing to 1."""
    n = torch.arange(size, dtype=torch.float32, device=device)
    w = torch.exp(-0.5 * ((n - n.mean()) / std) ** 2)
    window = torch.outer(w, w)
    return window / window.sum()


def hog_maps(gray: Tensor, patch: int, bins: int = HOG_BINS) -> Tensor:
    """Per-pixel oriented-gradient histograms (B, bins, H, W) of a [0, 1] luma image (B, 1, H, W)."""
    sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=gray.device)
    padded = F.pad(gray.float(), (1, 1, 1, 1), mode="reflect")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel.T.contiguous().view(1, 1, 3, 3))
    magnitude = torch.sqrt(gx**2 + gy**2)
    # the published binning: atan2(gx, gy) in units of pi / bins, floored, modulo bins (unsigned orientation)
    index = torch.floor(torch.atan2(gx, gy) / math.pi * bins).long() % bins
    h, w = gray.shape[-2:]
    window = gaussian_window(patch, patch // 2, gray.device).repeat(h // patch, w // patch)
    votes = F.one_hot(index[:, 0], bins).permute(0, 3, 1, 2).float() * (magnitude * window)
    cell = patch // 2
    cells = F.avg_pool2d(votes, cell) * cell * cell  # sums over each cell
    return F.interpolate(cells, size=(h, w), mode="bilinear", align_corners=False).to(gray.dtype)


def mgf_maps(gray: Tensor, radii: tuple[int, ...] = MGF_RADII) -> Tensor:
    """Multi-scale log-ratio gradient magnitudes (B, len(radii), H, W) of a [0, 1] luma image."""
    scales = []
    for r in radii:
        k = 2 * r + 1
        padded = F.pad(gray.float(), (r, r, r, r), mode="reflect") + MGF_OFFSET
        halves = torch.zeros(4, 1, k, k, device=gray.device)
        halves[0, :, :, : r + 1] = 1.0  # left half, centre column included
        halves[1, :, :, r:] = 1.0  # right half
        halves[2, :, : r + 1, :] = 1.0  # top half, centre row included
        halves[3, :, r:, :] = 1.0  # bottom half
        left, right, top, bottom = F.conv2d(padded, halves).unbind(1)
        gx, gy = torch.log(left / right), torch.log(top / bottom)
        scales.append(torch.sqrt(gx**2 + gy**2))
    return torch.stack(scales, 1).to(gray.dtype)


@dataclass(frozen=True)
class CDRTarget:
    """A target: its per-pixel map of a 3-channel image, the map's channels, whether it reads the
    [0, 1] image (``unit``; else the normalised one) and whether it is a picture for the report."""

    image: Callable[[Tensor, int], Tensor]
    channels: int
    unit: bool = False
    pictured: bool = False

    def compute(self, rgb: Tensor, patch: int) -> Tensor:
        """Per-patch target vectors (B, N, length(patch))."""
        return patchify(self.image(rgb, patch), patch)

    def length(self, patch: int) -> int:
        return patch * patch * self.channels


CDR_TARGETS: dict[str, CDRTarget] = {
    "gray": CDRTarget(lambda rgb, p: grayscale(rgb), 1, pictured=True),
    "rgb": CDRTarget(lambda rgb, p: rgb, 3, pictured=True),
    "spatial": CDRTarget(spatially_degraded, 3, pictured=True),
    "hog": CDRTarget(lambda rgb, p: hog_maps(grayscale(rgb), p), HOG_BINS, unit=True),
    "mgf": CDRTarget(lambda rgb, p: mgf_maps(grayscale(rgb)), len(MGF_RADII), unit=True),
}
