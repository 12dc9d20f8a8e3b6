"""Per-source, per-modality normalisation statistics (mean/std of [0, 1] values)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from codemae.config import SourceConfig
from codemae.data.listing import source_modalities, source_name
from codemae.data.sources import Source
from codemae.data.transforms import Normalisation
from codemae.errors import DataError

log = logging.getLogger(__name__)
FINGERPRINT_LENGTH = 12  # hex digits of a source's fingerprint in its statistics cache name


def compute_stats(source: Source, max_samples: int, indices: np.ndarray | None = None,
                  skip_unreadable: bool = False) -> dict[str, Normalisation]:
    """Per-channel mean and std over up to ``max_samples`` evenly spaced samples (of ``indices``, if
    given), nodata (NaN) pixels left out; ``skip_unreadable`` passes over samples that fail to load
    (``data.on_error=skip``)."""
    pool = np.arange(len(source)) if indices is None else np.asarray(indices)
    n = len(pool)
    picks = pool[np.unique(np.linspace(0, n - 1, num=min(n, max_samples)).round().astype(int))]
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for i in picks:
        try:
            arrays = source.load(int(i))
        except DataError:
            if not skip_unreadable:
                raise
            continue
        for m, x in arrays.items():
            flat = x.reshape(-1, x.shape[2]).astype(np.float64)  # NaN: a nodata pixel, left out
            sums[m] = sums.get(m, 0) + np.nansum(flat, 0)
            squares[m] = squares.get(m, 0) + np.nansum(flat**2, 0)
            counts[m] = counts.get(m, 0) + (~np.isnan(flat)).sum(0)
    stats = {}
    for m in sums:
        if not counts[m].all():
            raise DataError(f"source '{source.name}': every sampled {m} pixel is nodata; no statistics to compute")
        mean = sums[m] / counts[m]
        std = np.sqrt(np.maximum(squares[m] / counts[m] - mean**2, 0.0))
        stats[m] = Normalisation(mean.round(6).tolist(), np.maximum(std, 1e-6).round(6).tolist())
    return stats


def image_channel_stats(images: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased std (float64; std at least 1e-6) over every pixel of ``(C, H, W)``
    images, summed image by image rather than holding all their pixels at once."""
    n, total, squares = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for image in images:
        x = image.flatten(1).double()
        n, total, squares = n + x.shape[1], total + x.sum(1), squares + x.square().sum(1)
    mean = total / n
    std = ((squares - n * mean.square()) / max(n - 1, 1)).clamp_min(0).sqrt()
    return mean, std.clamp_min(1e-6)


def save_stats(stats: dict[str, Normalisation], path: Path, samples: int) -> None:
    """Write atomically (temp file + rename): other ranks may be reading the same path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {m: {"mean": s.mean, "std": s.std} for m, s in stats.items()} | {"samples": samples}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load_stats(path: Path, modalities: tuple[str, ...]) -> dict[str, Normalisation]:
    """Read a stats JSON written by ``codemae stats``; every modality must be present."""
    try:
        data = json.loads(Path(path).read_text())
        return {m: Normalisation(list(data[m]["mean"]), list(data[m]["std"])) for m in modalities}
    except FileNotFoundError as err:
        raise DataError(f"stats file {path} not found (run `codemae stats` to write it)") from err
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"stats file {path} is not a codemae stats file (missing or bad {err})") from err


def source_stats(source: Source, cfg: SourceConfig, cache: Path, samples: int, write: bool,
                 skip_unreadable: bool = False) -> dict[str, Normalisation]:
    """Normalisation of one source: given in the config, from a stats file, none, or computed
    once and cached in the run folder."""
    if cfg.stats == "none":
        return {m: Normalisation([0.0], [1.0]) for m in source.modalities}
    if cfg.stats == "given":
        return {m: Normalisation(getattr(cfg.given, f"{m}_mean"), getattr(cfg.given, f"{m}_std"))
                for m in source.modalities}
    if cfg.stats != "auto":
        return load_stats(Path(cfg.stats), source.modalities)
    if cache.is_file():
        return load_stats(cache, source.modalities)
    log.info("computing normalisation statistics of source '%s' over up to %d samples", source.name, samples)
    stats = compute_stats(source, samples, skip_unreadable=skip_unreadable)
    if write:
        save_stats(stats, cache, min(samples, len(source)))
    return stats


def recorded_stats(cfg: SourceConfig, run_dirs: list[Path]) -> dict[str, Normalisation] | None:
    """The normalisation a finished run used for source ``cfg``: from its config (``none``, ``given``),
    its stats file, or (``auto``) the newest cache under ``<run_dir>/stats`` of the first of ``run_dirs``
    that has one; None when none is found (a shard set keeps its statistics in its manifest, not the run
    folder)."""
    modalities = source_modalities(cfg)
    if cfg.stats == "none":
        return {m: Normalisation([0.0], [1.0]) for m in modalities}
    if cfg.stats == "given":
        return {m: Normalisation(getattr(cfg.given, f"{m}_mean"), getattr(cfg.given, f"{m}_std")) for m in modalities}
    if cfg.stats != "auto":
        candidates = [Path(cfg.stats)]
    else:
        name = source_name(cfg)
        pattern = f"{name}-{'[0-9a-f]' * FINGERPRINT_LENGTH}.json"  # as build_dataset names the cache
        candidates = [p for d in run_dirs  # the first run folder that has one, its newest first
                      for p in sorted((d / "stats").glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)]
    for path in candidates:
        try:
            return load_stats(path, modalities)
        except DataError:
            continue
    return None


def pooled_stats(parts: list[Normalisation]) -> Normalisation:
    """One normalisation for several sources' statistics (equal weights): the mean of their means and
    the std of the equal mixture; identical parts give themselves."""
    if all(p == parts[0] for p in parts):
        return parts[0]
    width = max(len(p.mean) for p in parts)
    means = np.array([np.broadcast_to(p.mean, width) for p in parts], dtype=np.float64)
    stds = np.array([np.broadcast_to(p.std, width) for p in parts], dtype=np.float64)
    mean = means.mean(0)
    std = np.sqrt(np.maximum((stds**2 + means**2).mean(0) - mean**2, 0.0))
    return Normalisation(mean.round(6).tolist(), np.maximum(std, 1e-6).round(6).tolist())
