"""Checkpoints written atomically (temp file, fsync, rename) and read with ``weights_only=True``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch

from codemae.errors import DataError, TrainingError

# the version of codemae's model layout a checkpoint's weights follow (stored as "layout"):
# 1: before the published HiViT/iTPN structure (codemae 0.1.0 up to 2026-11-23); 2: the published one
LAYOUT = 2


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` to ``path`` so that ``path`` always holds a complete checkpoint.

    On failure (disk full, no permission) the temp file is removed, the previous
    checkpoint stays in place and a :class:`TrainingError` names the path.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise TrainingError(
            f"cannot write checkpoint {path}: {err.strerror or err}; the previous checkpoint is intact"
        ) from err


def load_checkpoint(path: str | Path, mmap: bool = False, allowed: Sequence[type] = ()) -> dict[str, Any]:
    """Read a checkpoint as data only; a payload that needs pickled code is refused. ``mmap``: tensors
    are mapped from the file rather than read (cheap when only the other entries are wanted);
    ``allowed``: plain-data classes the file may also hold (the published files' ``argparse.Namespace``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} not found")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"checkpoint {path} cannot be loaded as weights only: {reason}") from err
    if not isinstance(state, dict):
        raise DataError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint's mapping")
    return state


def check_entries(state: dict[str, Any], path: str | Path, *keys: str) -> None:
    """``state`` has each of ``keys`` with a value of its kind: ``model`` a mapping of names to tensors,
    ``config`` and ``optimizer`` mappings, ``step`` a non-negative integer."""
    kinds = {"model": dict, "config": dict, "optimizer": dict, "step": int}
    for key in keys:
        value = state.get(key)
        ok = isinstance(value, kinds[key]) and not isinstance(value, bool)
        if key == "model":
            ok = ok and all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items())
        if key == "step":
            ok = ok and value >= 0
        if not ok:
            raise DataError(f"checkpoint {path}: entry '{key}' is missing or not a {kinds[key].__name__} "
                            "of the expected kind; not a codemae checkpoint")
