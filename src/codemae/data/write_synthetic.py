"""Generated data written to disk in the layout a task's command reads (``codemae synth``).

``damage``: bi-temporal pairs in the BRIGHT layout, ``pre-event/<name>_pre_disaster.tif`` (optical
RGB), ``post-event/<name>_post_disaster.tif`` (SAR, one band), ``target/<name>_building_damage.tif``
(0 background, 1 intact, 2 damaged, 3 destroyed), all uint8 GeoTIFF-compatible TIFFs, and the
split lists ``train.txt``, ``val.txt``, ``test.txt`` (names without suffix).
``scenes``: single-date paired scenes as a paired folder (``opt/``, ``sar/`` PNGs) with their
land-cover label rasters in ``labels/``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from codemae.config import SyntheticConfig
from codemae.data.synthetic import generate_damage_pair, generate_scene
from codemae.errors import ConfigError

SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
BRIGHT_FOLDERS = {"pre": ("pre-event", "_pre_disaster"), "post": ("post-event", "_post_disaster"),
                  "target": ("target", "_building_damage")}


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, a single band squeezed to (H, W)."""
    out = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return out[:, :, 0] if out.ndim == 3 and out.shape[2] == 1 else out


def split_names(names: list[str]) -> dict[str, list[str]]:
    """Consecutive train / val / test parts of ``names`` by :data:`SPLIT_FRACTIONS` (each non-empty when
    there are at least three names)."""
    n = len(names)
    n_val = max(1, round(SPLIT_FRACTIONS["val"] * n)) if n >= 3 else 0
    n_test = max(1, round(SPLIT_FRACTIONS["test"] * n)) if n >= 3 else 0
    n_train = n - n_val - n_test
    return {"train": names[:n_train], "val": names[n_train:n_train + n_val], "test": names[n_train + n_val:]}


def write_damage(out: Path, n: int, size: int, seed: int) -> list[Path]:
    cfg = SyntheticConfig(image_size=size)
    for folder, _ in BRIGHT_FOLDERS.values():
        (out / folder).mkdir(parents=True, exist_ok=True)
    names = [f"synthetic_{i:05d}" for i in range(n)]
    for i, name in enumerate(names):
        pair = generate_damage_pair(seed + i, cfg)
        arrays = {"pre": to_uint8(pair.optical), "post": to_uint8(pair.sar), "target": pair.target.astype(np.uint8)}
        for key, (folder, suffix) in BRIGHT_FOLDERS.items():
            tifffile.imwrite(out / folder / f"{name}{suffix}.tif", arrays[key], compression="zlib")
    lists = []
    for split, members in split_names(names).items():
        lists.append(out / f"{split}.txt")
        lists[-1].write_text("".join(f"{m}\n" for m in members))
    return lists


def write_scenes(out: Path, n: int, size: int, seed: int) -> list[Path]:
    cfg = SyntheticConfig(image_size=size)
    folders = [out / "opt", out / "sar", out / "labels"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = generate_scene(seed + i, cfg)
        name = f"scene_{i:05d}.png"
        Image.fromarray(to_uint8(scene.optical)).save(out / "opt" / name)
        Image.fromarray(to_uint8(scene.sar)).save(out / "sar" / name)
        Image.fromarray(scene.labels.astype(np.uint8)).save(out / "labels" / name)
    return folders


TASKS: dict[str, Callable[[Path, int, int, int], list[Path]]] = {"damage": write_damage, "scenes": write_scenes}


def write_synthetic(task: str, out: str | Path, n: int, size: int, seed: int) -> list[Path]:
    """Write ``n`` generated samples of ``task`` (scene seeds ``seed``..``seed + n - 1``) under ``out``."""
    if task not in TASKS:
        raise ConfigError(f"--task {task}: unknown; choose one of {', '.join(TASKS)}")
    if n < 1 or size < 16:
        raise ConfigError(f"--n {n} --size {size}: need at least 1 sample of at least 16 pixels")
    if task == "damage" and n < 3:
        raise ConfigError(f"--n {n}: the damage task needs at least 3 scenes (one each for train, val and test)")
    return TASKS[task](Path(out), n, size, seed)
