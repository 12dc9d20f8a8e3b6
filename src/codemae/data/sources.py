"""Data sources: paired folders, single-modality folders and synthetic scenes.

A source lists its samples when built (so a missing file, an incomplete pair or
an empty folder is reported before training starts) and loads one sample as a
dict of float32 (H, W, C) arrays in [0, 1], one per modality it holds.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from codemae.config import SourceConfig
from codemae.data.readers import IMAGE_SUFFIXES, load_unit_image
from codemae.data.synthetic import generate_scene
from codemae.errors import DataError

SCALING_KEYS = {"opt": "opt_scaling", "sar": "sar_scaling"}
CHANNEL_KEYS = {"opt": "model.opt_channels", "sar": "model.sar_channels"}


class Source:
    """A list of samples of one or both modalities."""

    name: str
    modalities: tuple[str, ...]
    stems: list[str]  # one identifier per sample, in order

    @property
    def paired(self) -> bool:
        return len(self.modalities) == 2

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


class FolderSource(Source):
    """Images on disk: ``<root>/opt`` and ``<root>/sar`` with matching stems (paired),
    or any image tree under ``<root>`` (one modality). An optional split CSV (first
    column the file stem, a ``split`` column) selects the samples of one split."""

    def __init__(self, cfg: SourceConfig, channels: dict[str, int]) -> None:
        self.cfg = cfg
        self.name = cfg.name or Path(cfg.root).name
        self.channels = channels
        root = Path(cfg.root)
        if not root.is_dir():
            raise DataError(f"source '{self.name}': root folder {root} does not exist")
        if cfg.kind == "paired":
            self.modalities = ("opt", "sar")
            files = {m: index_images(root / m, recursive=False) for m in self.modalities}
            check_pairs(files["opt"], files["sar"], root)
        else:
            self.modalities = (cfg.kind,)
            files = {cfg.kind: index_images(root, recursive=True)}
        stems = sorted(files[self.modalities[0]])
        if cfg.split is not None:
            stems = select_split(stems, self._split_csv(root), cfg.split, self.name)
        self.files = [{m: files[m][s] for m in self.modalities} for s in stems]
        self.stems = stems

    def _split_csv(self, root: Path) -> Path:
        path = Path(self.cfg.split_csv) if self.cfg.split_csv else root / "tiles.csv"
        if not path.is_file():
            raise DataError(f"source '{self.name}': split '{self.cfg.split}' asked for but split CSV {path} not found")
        return path

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> dict[str, np.ndarray]:
        files = self.files[index]
        arrays = {
            m: load_unit_image(path, getattr(self.cfg, SCALING_KEYS[m]), self.channels[m], CHANNEL_KEYS[m])
            for m, path in files.items()
        }
        if self.paired and arrays["opt"].shape[:2] != arrays["sar"].shape[:2]:
            raise DataError(
                f"pair '{self.stems[index]}': optical {files['opt']} is {_size(arrays['opt'])} "
                f"but SAR {files['sar']} is {_size(arrays['sar'])}"
            )
        return arrays


class SyntheticSource(Source):
    """Generated paired scenes (see :mod:`codemae.data.synthetic`), scene ``i`` seeded by ``seed + i``."""

    modalities = ("opt", "sar")

    def __init__(self, cfg: SourceConfig, channels: dict[str, int]) -> None:
        self.cfg = cfg
        self.name = cfg.name or "synthetic"
        self.channels = channels
        if channels["opt"] != 3:
            raise DataError(f"source '{self.name}': synthetic scenes are RGB; set model.opt_channels=3")

    def __len__(self) -> int:
        return self.cfg.synthetic.num_scenes

    @property
    def stems(self) -> list[str]:
        return [str(i) for i in range(len(self))]

    def load(self, index: int) -> dict[str, np.ndarray]:
        scene = generate_scene(self.cfg.seed + index, self.cfg.synthetic)
        sar = np.repeat(scene.sar, self.channels["sar"], axis=2)
        return {"opt": scene.optical, "sar": sar}


def build_source(cfg: SourceConfig, channels: dict[str, int]) -> Source:
    source = SyntheticSource(cfg, channels) if cfg.kind == "synthetic" else FolderSource(cfg, channels)
    if len(source) == 0:
        raise DataError(f"source '{source.name}': no samples (root {cfg.root or '-'}, split {cfg.split})")
    return source


def index_images(folder: Path, recursive: bool) -> dict[str, Path]:
    """Map file stem (relative path without suffix, for trees) -> image path."""
    if not folder.is_dir():
        raise DataError(f"folder {folder} does not exist")
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    found: dict[str, Path] = {}
    for path in sorted(pattern):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        stem = str(path.relative_to(folder).with_suffix(""))
        if stem in found:
            raise DataError(f"two images with the same stem in {folder}: {found[stem].name} and {path.name}")
        found[stem] = path
    if not found:
        raise DataError(f"folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def check_pairs(opt: dict[str, Path], sar: dict[str, Path], root: Path) -> None:
    """Every optical image needs a SAR image of the same stem and vice versa."""
    for have, other, label in ((opt, sar, "sar"), (sar, opt, "opt")):
        missing = sorted(set(have) - set(other))
        if missing:
            raise DataError(
                f"incomplete pair: {have[missing[0]]} has no counterpart in {root / label} "
                f"({len(missing)} such file{'s' if len(missing) > 1 else ''})"
            )


def select_split(stems: list[str], csv_path: Path, split: str, source: str) -> list[str]:
    """Stems listed under ``split`` in the CSV; a listed stem with no file is an error."""
    with csv_path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or "split" not in header:
            raise DataError(f"split CSV {csv_path} needs a header with a 'split' column")
        col = header.index("split")
        wanted = [row[0] for row in reader if row and row[col] == split]
    if not wanted:
        raise DataError(f"source '{source}': split CSV {csv_path} lists no samples for split '{split}'")
    available = set(stems)
    absent = [s for s in wanted if s not in available]
    if absent:
        raise DataError(f"split CSV {csv_path} names '{absent[0]}', which has no image ({len(absent)} absent)")
    return wanted


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"
