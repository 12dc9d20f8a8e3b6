"""Augmentation and normalisation: one RandomResizedCrop + flip shared by all images of a sample."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Normalisation:
    """Per-channel mean and std of one modality, on [0, 1] values."""

    mean: list[float]
    std: list[float]

    def __call__(self, x: Tensor) -> Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std

    def fill_nodata(self, x: Tensor) -> Tensor:
        """(C, H, W) [0, 1] values with nodata (NaN) pixels set to the mean: 0 once normalised, and no NaN
        spread by resampling."""
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1).expand_as(x)
        return torch.where(torch.isnan(x), mean, x)


@dataclass(frozen=True)
class CropBox:
    """Where a sample's crop came from: box (top, left, height, width) in an image of
    ``image_size`` (height, width) pixels, and whether it was flipped horizontally."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    image_size: tuple[int, int]


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, h, w): area fraction in ``scale``, log-uniform aspect ``ratio``.

    Ten tries, then the largest centred box within the ratio range (as torchvision does).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[2] * (height - h + 1))
            left = int(u[3] * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PairedCrop:
    """RandomResizedCrop (bicubic) + horizontal flip applied identically to every image of a
    sample, then per-modality normalisation. Arrays in, (C, H, W) tensors out."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float], hflip: bool,
                 norms: dict[str, Normalisation]) -> None:
        self.size = size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        self.norms = norms

    def __call__(self, arrays: dict[str, np.ndarray], generator: torch.Generator) -> tuple[dict[str, Tensor], CropBox]:
        """Crop, resize, flip and normalise each image; also return each modality's
        normalisation (``<m>_mean``, ``<m>_std``) so [0, 1] values can be recovered."""
        first = next(iter(arrays.values()))
        top, left, h, w = crop_box(first.shape[0], first.shape[1], self.scale, self.ratio, generator)
        flip = self.hflip and bool(torch.rand(1, generator=generator) < 0.5)
        out = {}
        for m, array in arrays.items():
            norm = self.norms[m]
            x = torch.from_numpy(np.ascontiguousarray(array[top : top + h, left : left + w])).permute(2, 0, 1)
            x = F.interpolate(norm.fill_nodata(x)[None], size=(self.size, self.size), mode="bicubic",
                              align_corners=False, antialias=True)[0]
            out[m] = norm(x.flip(-1) if flip else x)
            out[f"{m}_mean"], out[f"{m}_std"] = torch.tensor(norm.mean), torch.tensor(norm.std)
        return out, CropBox(top, left, h, w, flip, (first.shape[0], first.shape[1]))
