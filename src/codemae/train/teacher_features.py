"""``codemae teacher-cache``: run a frozen teacher once over the data and store its features
(read back during pretraining by :class:`codemae.data.teacher_cache.TeacherFeatureCache`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from codemae.data.sources import Source
from codemae.models.teacher import Teacher


def write_teacher_cache(teacher: Teacher, source: Source, directory: str | Path, input_size: int,
                        batch_size: int = 16, progress: bool = True) -> Path:
    """Run ``teacher`` over every optical image of ``source`` and store the grids atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    grid = input_size // teacher.patch_size
    data_path = directory / f"{source.name}.npy"
    tmp = directory / f".{source.name}.npy.tmp"
    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                      shape=(len(source), grid, grid, teacher.dim))
    device = next(iter(teacher.buffers())).device
    for start in tqdm(range(0, len(source), batch_size), desc=f"teacher features of {source.name}",
                      disable=not progress):
        images = [torch.from_numpy(np.nan_to_num(source.load(i)["opt"], nan=0.0)).permute(2, 0, 1)[None]  # nodata: 0
                  for i in range(start, min(start + batch_size, len(source)))]
        batch = torch.cat([F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False,
                                         antialias=True) for x in images]).to(device)
        store[start : start + len(images)] = teacher(batch).permute(0, 2, 3, 1).cpu().numpy().astype(np.float16)
    store.flush()
    del store
    os.replace(tmp, data_path)
    meta = {"stems": source.stems, "input_size": input_size, "grid": grid, "dim": teacher.dim,
            "teacher": type(teacher).__name__}
    (directory / f"{source.name}.json").write_text(json.dumps(meta))
    return data_path
