"""Teacher features computed once per source image and resampled to each random crop.

``codemae teacher-cache`` runs the frozen teacher over every optical image of a
source, resized whole to the teacher's input size, and stores the patch-feature
grids in ``<dir>/<source>.npy`` (N, h, w, D, float16, memory-mapped) beside
``<source>.json`` (the sample stems and the teacher's description). During
pretraining each crop's features are read from the grid at the crop box with
RoIAlign-style bilinear sampling (2x2 samples per output cell), flipped with the
image, on the student's token grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from codemae.data.sources import Source
from codemae.data.transforms import CropBox
from codemae.errors import DataError

SAMPLES_PER_CELL = 2


def roi_align(features: Tensor, box: CropBox, grid: int, samples: int = SAMPLES_PER_CELL) -> Tensor:
    """Features (D, h, w) covering a whole image -> (grid*grid, D) for ``box`` of that image."""
    n = grid * samples
    image_h, image_w = box.image_size
    steps = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    ys = (box.top + steps * box.height) / image_h * 2 - 1
    xs = (box.left + steps * box.width) / image_w * 2 - 1
    points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # (1, n, n, (x, y))
    sampled = F.grid_sample(features[None].float(), points, mode="bilinear", padding_mode="border",
                            align_corners=False)
    pooled = F.avg_pool2d(sampled, samples)[0]
    if box.flip:
        pooled = pooled.flip(-1)
    return pooled.flatten(1).T


class TeacherFeatureCache:
    """The cached feature grids of one source, checked against the source's samples."""

    def __init__(self, directory: str | Path, source: Source) -> None:
        directory = Path(directory)
        meta_path, data_path = directory / f"{source.name}.json", directory / f"{source.name}.npy"
        if not meta_path.is_file() or not data_path.is_file():
            raise DataError(f"teacher cache {directory} has no features for source '{source.name}' "
                            f"(run `codemae teacher-cache` with this config)")
        meta = json.loads(meta_path.read_text())
        if meta["stems"] != source.stems:
            raise DataError(f"teacher cache {data_path} was written for other samples than source "
                            f"'{source.name}' now holds ({len(meta['stems'])} vs {len(source.stems)}); rewrite it")
        self.features = np.load(data_path, mmap_mode="r")
        self.dim = self.features.shape[-1]

    def crop(self, index: int, box: CropBox, grid: int) -> Tensor:
        grid_hwd = torch.from_numpy(np.array(self.features[index], dtype=np.float32))
        return roi_align(grid_hwd.permute(2, 0, 1), box, grid)
