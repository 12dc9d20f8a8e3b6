"""Bi-temporal building damage data in the BRIGHT layout, checked before any training.

``<root>/pre-event/<name>_pre_disaster.tif`` (optical), ``<root>/post-event/<name>_post_disaster.tif``
(SAR), ``<root>/target/<name>_building_damage.tif`` (0 background, 1 intact, 2 damaged, 3 destroyed),
or ``<name>.tif`` in each folder; split lists ``<split>.txt`` (or BRIGHT's ``<split>_set.txt``) with one
name per line, without suffix. A listed name without its three files, rasters of different sizes, a
label raster of several bands or an unknown label value are :class:`DataError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from codemae.config import ScalingConfig
from codemae.data.readers import load_unit_image, read_header, read_image
from codemae.data.sources import Source
from codemae.data.synthetic import DAMAGE_CLASSES
from codemae.data.transforms import Normalisation
from codemae.data.write_synthetic import BRIGHT_FOLDERS
from codemae.errors import DataError

NUM_CLASSES = len(DAMAGE_CLASSES)
CHANNEL_KEYS = {"opt": "model.opt_channels", "sar": "model.sar_channels"}


def read_split(root: Path, split: str) -> tuple[Path, list[str]]:
    """The split list of ``split`` in ``root`` and its names."""
    candidates = [root / f"{split}.txt", root / f"{split}_set.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(f"{root}: no split list {candidates[0].name} (or {candidates[1].name})")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"split list {path}: lists no scene")
    return path, names


def scene_file(root: Path, key: str, name: str) -> Path | None:
    folder, suffix = BRIGHT_FOLDERS[key]
    return next((p for p in (root / folder / f"{name}{suffix}.tif", root / folder / f"{name}.tif") if p.is_file()),
                None)


def read_target(path: Path) -> np.ndarray:
    """A single-band label raster as int64 (H, W), refusing several bands and values other than 0..3."""
    raster = read_image(path)
    if raster.shape[2] != 1:
        raise DataError(f"{path}: a label raster has one band, this one has {raster.shape[2]}")
    values = np.unique(raster)
    unknown = values[~np.isin(values, np.arange(NUM_CLASSES))]
    if unknown.size:
        raise DataError(f"{path}: unknown label value {unknown[0]:g} (expected 0 background, 1 intact, "
                        f"2 damaged, 3 destroyed)")
    return raster[:, :, 0].astype(np.int64)


class DamageScenes(Source):
    """The scenes of one split list: ``load(i)`` gives [0, 1] ``opt`` and ``sar`` arrays (H, W, C) matched
    to the encoder's channels, ``target(i)`` the checked label raster."""

    modalities = ("opt", "sar")

    def __init__(self, root: str | Path, split: str, channels: dict[str, int]) -> None:
        root = Path(root)
        self.list_path, self.stems = read_split(root, split)
        self.name, self.channels = f"{root.name}/{split}", channels
        self.files = [self._files(root, name) for name in self.stems]

    def _files(self, root: Path, name: str) -> dict[str, Path]:
        pre = scene_file(root, "pre", name)
        if pre is None:
            raise DataError(f"split list {self.list_path}: '{name}' has no pre-event image "
                            f"({BRIGHT_FOLDERS['pre'][0]}/{name}{BRIGHT_FOLDERS['pre'][1]}.tif)")
        files = {"pre": pre}
        size = (read_header(pre).height, read_header(pre).width)
        for key in ("post", "target"):
            path = scene_file(root, key, name)
            folder, suffix = BRIGHT_FOLDERS[key]
            if path is None:
                raise DataError(f"{pre}: no matching {folder} image {folder}/{name}{suffix}.tif")
            header = read_header(path)
            if (header.height, header.width) != size:
                raise DataError(f"{path}: {header.height}x{header.width} pixels, but its pre-event image {pre} "
                                f"is {size[0]}x{size[1]}")
            files[key] = path
        return files

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> dict[str, np.ndarray]:
        files = self.files[index]
        return {m: load_unit_image(files[key], ScalingConfig(), self.channels[m], CHANNEL_KEYS[m])
                for m, key in (("opt", "pre"), ("sar", "post"))}

    def target(self, index: int) -> np.ndarray:
        return read_target(self.files[index]["target"])

    def class_counts(self) -> Tensor:
        """Pixels per class over every label raster (each read and checked once: a bad value stops the
        run before any training)."""
        return sum((torch.bincount(torch.from_numpy(self.target(i)).flatten(), minlength=NUM_CLASSES)
                    for i in range(len(self))), torch.zeros(NUM_CLASSES, dtype=torch.long))

    def tensors(self, index: int, norms: dict[str, Normalisation]) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised pre (C, H, W), post (C, H, W) and the target (H, W) of scene ``index``; nodata pixels
        (NaN from the reader) become the training mean, 0 once normalised."""
        arrays = self.load(index)
        pre, post = (norms[m](norms[m].fill_nodata(torch.from_numpy(arrays[m]).permute(2, 0, 1)))
                     for m in ("opt", "sar"))
        return pre, post, torch.from_numpy(self.target(index))


class DamageCrops(Dataset):
    """``crops_per_scene`` random ``size``-pixel crops of every scene per pass, randomly flipped (the same
    box and flips for pre, post and target); scenes smaller than ``size`` are zero-padded (label 0)."""

    def __init__(self, scenes: DamageScenes, norms: dict[str, Normalisation], size: int, crops_per_scene: int,
                 generator: torch.Generator) -> None:
        self.scenes, self.norms, self.size, self.per_scene = scenes, norms, size, crops_per_scene
        self.generator = generator

    def __len__(self) -> int:
        return len(self.scenes) * self.per_scene

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        pre, post, target = self.scenes.tensors(index // self.per_scene, self.norms)
        height, width = target.shape
        pad = (0, max(0, self.size - width), 0, max(0, self.size - height))
        stack = torch.nn.functional.pad(torch.cat([pre, post, target[None].to(pre.dtype)]), pad)
        top, left = (int(torch.randint(0, n - self.size + 1, (1,), generator=self.generator))
                     for n in stack.shape[-2:])
        crop = stack[:, top:top + self.size, left:left + self.size]
        for axis in (-1, -2):
            if torch.rand(1, generator=self.generator) < 0.5:
                crop = crop.flip(axis)
        c = pre.shape[0]
        return crop[:c], crop[c:-1], crop[-1].round().long()
