"""Per-source, per-modality normalisation statistics (mean/std of [0, 1] values)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from codemae.data.sources import Source
from codemae.data.transforms import Normalisation
from codemae.errors import DataError


def compute_stats(source: Source, max_samples: int, indices: np.ndarray | None = None,
                  skip_unreadable: bool = False) -> dict[str, Normalisation]:
    """Per-channel mean and std over up to ``max_samples`` evenly spaced samples (of ``indices``, if
    given); ``skip_unreadable`` passes over samples that fail to load (``data.on_error=skip``)."""
    pool = np.arange(len(source)) if indices is None else np.asarray(indices)
    n = len(pool)
    picks = pool[np.unique(np.linspace(0, n - 1, num=min(n, max_samples)).round().astype(int))]
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for i in picks:
        try:
            arrays = source.load(int(i))
        except DataError:
            if not skip_unreadable:
                raise
            continue
        for m, x in arrays.items():
            flat = x.reshape(-1, x.shape[2]).astype(np.float64)
            sums[m] = sums.get(m, 0) + flat.sum(0)
            squares[m] = squares.get(m, 0) + (flat**2).sum(0)
            counts[m] = counts.get(m, 0) + flat.shape[0]
    stats = {}
    for m in sums:
        mean = sums[m] / counts[m]
        std = np.sqrt(np.maximum(squares[m] / counts[m] - mean**2, 0.0))
        stats[m] = Normalisation(mean.round(6).tolist(), np.maximum(std, 1e-6).round(6).tolist())
    return stats


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
