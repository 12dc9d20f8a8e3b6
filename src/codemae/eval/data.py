"""Labelled evaluation data: class folders, paired folders with label CSVs, synthetic scenes;
splits, K-shot sampling and the pixel-to-multi-label rule."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from codemae.config import ScalingConfig, SourceConfig, SyntheticConfig
from codemae.data.listing import index_images
from codemae.data.readers import read_image
from codemae.data.sources import FolderSource, Source, SyntheticSource
from codemae.data.synthetic import CLASSES, generate_scene
from codemae.data.transforms import Normalisation
from codemae.errors import DataError


@dataclass
class LabelledSet:
    """A source plus one label per sample: class ids (N,) or multi-hot (N, C)."""

    source: Source
    labels: np.ndarray
    classes: list[str]

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2


def class_folders(root: str | Path, modality: str, channels: dict[str, int], scaling: ScalingConfig | None = None
                  ) -> LabelledSet:
    """``<root>/<class>/<image>``: one modality, the class from the folder name."""
    cfg = SourceConfig(kind=modality, root=str(root), **{f"{modality}_scaling": scaling or ScalingConfig()})
    source = FolderSource(cfg, channels)
    names = [stem.split("/")[0] for stem in source.stems]
    if any("/" not in stem for stem in source.stems):
        raise DataError(f"{root}: expected one sub-folder per class, found images directly in it")
    classes = sorted(set(names))
    return LabelledSet(source, np.array([classes.index(n) for n in names]), classes)


def paired_with_labels(root: str | Path, labels_csv: str | Path, channels: dict[str, int]) -> LabelledSet:
    """A paired folder and a CSV ``stem,label`` (labels separated by ';' make it multi-label)."""
    source = FolderSource(SourceConfig(kind="paired", root=str(root)), channels)
    with open(labels_csv, newline="") as f:
        rows = {r[0]: r[1].split(";") for r in csv.reader(f) if r and r[0] != "stem"}
    missing = [s for s in source.stems if s not in rows]
    if missing:
        raise DataError(f"label CSV {labels_csv} has no label for '{missing[0]}' ({len(missing)} missing)")
    classes = sorted({c for s in source.stems for c in rows[s]})
    if all(len(rows[s]) == 1 for s in source.stems):
        return LabelledSet(source, np.array([classes.index(rows[s][0]) for s in source.stems]), classes)
    hot = np.zeros((len(source), len(classes)), dtype=np.float32)
    for i, s in enumerate(source.stems):
        hot[i, [classes.index(c) for c in rows[s]]] = 1.0
    return LabelledSet(source, hot, classes)


def mask_files(source: FolderSource, masks: str | Path) -> list[Path]:
    """The label raster of each sample of a paired folder: same stem in ``masks``."""
    found = index_images(Path(masks), recursive=False)
    missing = [s for s in source.stems if s not in found]
    if missing:
        raise DataError(f"mask folder {masks} has no label raster for '{missing[0]}' ({len(missing)} missing)")
    return [found[s] for s in source.stems]


def read_mask(path: Path) -> np.ndarray:
    return read_image(path)[:, :, 0].astype(np.int64)


def paired_with_masks(root: str | Path, masks: str | Path, channels: dict[str, int], nodata: int = -1
                      ) -> LabelledSet:
    """A paired folder with per-pixel labels, as multi-label samples: a class is present when it
    covers at least 10% of all the pixels (``nodata`` pixels count in the total, never as a class)."""
    source = FolderSource(SourceConfig(kind="paired", root=str(root)), channels)
    maps = [read_mask(p) for p in mask_files(source, masks)]
    num_classes = max(int(m[m != nodata].max(initial=0)) for m in maps) + 1
    labels = np.stack([presence_labels(m, num_classes, ignore_index=nodata) for m in maps])
    return LabelledSet(source, labels, [str(c) for c in range(num_classes)])


def synthetic_scenes(n: int, image_size: int, seed: int, channels: dict[str, int], multilabel: bool = False
                     ) -> LabelledSet:
    """Generated paired scenes labelled by their dominant land-cover class (or, multi-label,
    the classes covering at least 10% of the pixels)."""
    cfg = SourceConfig(kind="synthetic", seed=seed, synthetic=SyntheticConfig(num_scenes=n, image_size=image_size))
    masks = [generate_scene(seed + i, cfg.synthetic).labels for i in range(n)]
    if multilabel:
        labels = np.stack([presence_labels(m, len(CLASSES)) for m in masks])
    else:
        labels = np.array([np.bincount(m.ravel(), minlength=len(CLASSES)).argmax() for m in masks])
    return LabelledSet(SyntheticSource(cfg, channels), labels, list(CLASSES))


def presence_labels(mask: np.ndarray, num_classes: int, min_fraction: float = 0.1,
                    ignore_index: int | None = None) -> np.ndarray:
    """Multi-hot: class c is present when it covers at least ``min_fraction`` of ALL the pixels
    (no-data pixels count in the total but are never a class), as the reference code divides."""
    valid = mask[mask != ignore_index] if ignore_index is not None else mask.ravel()
    counts = np.bincount(valid.astype(np.int64), minlength=num_classes)[:num_classes]
    return (counts >= min_fraction * max(mask.size, 1)).astype(np.float32)


def split_indices(labels: np.ndarray, fractions: dict[str, float], seed: int = 0) -> dict[str, np.ndarray]:
    """Stratified (by class, or by first present class for multi-label) random split."""
    keys = labels if labels.ndim == 1 else labels.argmax(1)
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {name: [] for name in fractions}
    for c in np.unique(keys):
        idx = rng.permutation(np.flatnonzero(keys == c))
        start = 0
        for k, (name, frac) in enumerate(fractions.items()):
            stop = len(idx) if k == len(fractions) - 1 else start + int(round(frac * len(idx)))
            out[name] += idx[start:stop].tolist()
            start = stop
    return {name: np.array(sorted(v), dtype=np.int64) for name, v in out.items()}


def k_shot(pool: np.ndarray, labels: np.ndarray, k: int, mode: str, num_classes: int, seed: int) -> np.ndarray:
    """K-shot training indices from ``pool``: ``balanced`` = K per class; ``random`` = K x classes
    drawn at random without regard to class (the reference code's "10-shot")."""
    rng = np.random.default_rng(seed)
    if mode == "random":
        if k * num_classes > len(pool):
            raise DataError(f"{k}-shot x {num_classes} classes needs {k * num_classes} samples; the pool has {len(pool)}")
        return np.sort(rng.choice(pool, size=k * num_classes, replace=False))
    keys = labels[pool] if labels.ndim == 1 else labels[pool].argmax(1)
    picks = []
    for c in range(num_classes):
        members = pool[keys == c]
        if len(members) < k:
            raise DataError(f"class {c} has {len(members)} samples in the training pool, fewer than {k} shots")
        picks.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picks))


class EvalImages(Dataset):
    """Un-augmented evaluation inputs: optional centre crop, resize to the model size, normalise."""

    def __init__(self, data: LabelledSet, modalities: tuple[str, ...], size: int, norms: dict[str, Normalisation],
                 centre_crop: int | None = None) -> None:
        self.data, self.modalities, self.size, self.norms, self.crop = data, modalities, size, norms, centre_crop

    def __len__(self) -> int:
        return len(self.data.source)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        arrays = self.data.source.load(index)
        out = {}
        for m in self.modalities:
            if m not in arrays:
                raise DataError(f"modality '{m}' asked for, but source '{self.data.source.name}' holds "
                                f"{', '.join(arrays)}")
            x = torch.from_numpy(arrays[m]).permute(2, 0, 1)
            if self.crop:
                h, w = x.shape[1:]
                top, left = max((h - self.crop) // 2, 0), max((w - self.crop) // 2, 0)
                x = x[:, top : top + self.crop, left : left + self.crop]
            x = F.interpolate(self.norms[m].fill_nodata(x)[None], size=(self.size, self.size), mode="bicubic",
                              align_corners=False, antialias=True)[0]
            out[m] = self.norms[m](x)
        return out
