"""Data sources: folders in the folder or reference layout, and synthetic scenes.

A source lists its samples when built (so a missing file, an incomplete pair or a
split list naming an absent image is reported before training starts) and loads
one sample as a dict of float32 (H, W, C) arrays in [0, 1], one per modality.
Listing is separate from loading so ``codemae data check`` can report every
problem of a tree instead of stopping at the first.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from codemae.config import SourceConfig
from codemae.data.readers import IMAGE_SUFFIXES, band_indices, read_header, read_image, unit_array
from codemae.data.synthetic import generate_scene
from codemae.errors import DataError

SCALING_KEYS = {"opt": "opt_scaling", "sar": "sar_scaling"}
CHANNEL_KEYS = {"opt": "model.opt_channels", "sar": "model.sar_channels"}
REFERENCE_FOLDERS = {"opt": "RGB", "sar": "SAR"}  # <root>/<dataset>/{RGB,SAR}/<name>.png
MAX_CONSECUTIVE_SKIPS = 16  # with data.on_error=skip, this many bad samples in a row stop the run


def source_modalities(cfg: SourceConfig) -> tuple[str, ...]:
    return ("opt", "sar") if cfg.kind in ("paired", "synthetic") else (cfg.kind,)


def source_name(cfg: SourceConfig) -> str:
    return cfg.name or cfg.dataset or Path(cfg.root).name or "synthetic"


def source_root(cfg: SourceConfig, data_root: str = "") -> Path:
    """The source's root folder: relative roots resolve against ``data.root``."""
    root = Path(cfg.root)
    return root if root.is_absolute() or not data_root else Path(data_root) / root


@dataclass
class Listing:
    """A source's files, before any pixel is read, and what is wrong with them."""

    modalities: tuple[str, ...]
    stems: list[str] = field(default_factory=list)
    files: list[dict[str, Path]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # each names the file or list at fault
    leaks: list[str] = field(default_factory=list)  # selected stems that a holdout split lists

    @property
    def paired(self) -> bool:
        return len(self.modalities) == 2


def list_source(cfg: SourceConfig, root: Path) -> Listing:
    """List a folder- or reference-layout source without raising on problems in the tree."""
    listing = Listing(source_modalities(cfg))
    if not root.is_dir():
        listing.problems.append(f"source '{source_name(cfg)}': root folder {root} does not exist")
        return listing
    base = root / cfg.dataset if cfg.layout == "reference" and cfg.dataset else root
    if cfg.kind == "paired" or cfg.layout == "reference":
        names = REFERENCE_FOLDERS if cfg.layout == "reference" else {"opt": "opt", "sar": "sar"}
        folders = {m: base / (getattr(cfg, f"{m}_dir") or names[m]) for m in listing.modalities}
        files = {m: index_images(folder, False, listing.problems) for m, folder in folders.items()}
    else:
        folders = {cfg.kind: root}
        files = {cfg.kind: index_images(root, True, listing.problems)}
    files = {m: renamed(found, cfg.stem_replace) for m, found in files.items()}
    if listing.paired:
        listing.problems += pair_problems(files["opt"], files["sar"], folders)
    stems = sorted(set.intersection(*(set(f) for f in files.values())))
    lists = split_lists(cfg, base, set(stems), listing.problems)
    if cfg.layout == "reference":
        chosen = set().union(*(lists[s] for s in cfg.splits)) if cfg.splits else set(stems)
        chosen -= set().union(*(lists[s] for s in cfg.exclude))
        stems = [s for s in stems if s in chosen]
    elif cfg.split is not None:
        stems = [s for s in stems if s in lists.get(cfg.split, set())]
    held = set().union(*(lists.get(s, set()) for s in cfg.holdout))
    listing.leaks = [s for s in stems if s in held]
    listing.stems = stems
    listing.files = [{m: files[m][s] for m in listing.modalities} for s in stems]
    return listing


def renamed(files: dict[str, Path], replacements: list[str]) -> dict[str, Path]:
    """``files`` with each ``old=new`` replacement applied to its stems, in order."""
    for item in replacements:
        old, _, new = item.partition("=")
        files = {stem.replace(old, new): path for stem, path in files.items()}
    return files


def split_lists(cfg: SourceConfig, base: Path, available: set[str], problems: list[str]) -> dict[str, set[str]]:
    """The source's split lists: name -> stems.

    Reference layout: ``<base>/<split>.txt`` for train, val, test and every list the source
    names, one image name per line. Folder layout: the
    rows of the split CSV (first column the stem, a ``split`` column). A list naming an
    image that does not exist is a problem; an absent holdout list is not.
    """
    if cfg.layout == "reference":
        names = dict.fromkeys(["train", "val", "test", *cfg.splits, *cfg.exclude, *cfg.holdout])
        paths = [base / f"{name}.txt" for name in names]
        lists = {path.stem: _checked(read_list(path), path, available, problems) for path in paths if path.is_file()}
        for name in cfg.splits + cfg.exclude:
            if name not in lists:
                problems.append(f"source '{source_name(cfg)}': split list {base / name}.txt not found")
                lists[name] = set()
        return lists
    csv_path = Path(cfg.split_csv) if cfg.split_csv else base / "tiles.csv"
    if not csv_path.is_file():
        if cfg.split is not None:
            problems.append(f"source '{source_name(cfg)}': split '{cfg.split}' asked for but split CSV "
                            f"{csv_path} not found")
        return {}
    lists: dict[str, set[str]] = {}
    for stem, split in read_split_csv(csv_path):
        lists.setdefault(split, set()).add(stem)
    if cfg.split is not None:
        if not lists.get(cfg.split):
            problems.append(f"source '{source_name(cfg)}': split CSV {csv_path} lists no samples for split "
                            f"'{cfg.split}'")
        _checked(lists.get(cfg.split, set()), csv_path, available, problems)
    return lists


def _checked(stems: set[str], path: Path, available: set[str], problems: list[str]) -> set[str]:
    absent = sorted(stems - available)
    if absent:
        problems.append(f"split list {path} names '{absent[0]}', which has no image ({len(absent)} absent)")
    return stems


def read_list(path: Path) -> set[str]:
    """Image names of a ``<split>.txt`` list, as stems (an image suffix is dropped)."""
    names = set()
    for line in path.read_text().splitlines():
        name = PurePosixPath(line.strip())
        if line.strip():
            names.add(str(name.with_suffix("")) if name.suffix.lower() in IMAGE_SUFFIXES else str(name))
    return names


def read_split_csv(path: Path) -> list[tuple[str, str]]:
    """(stem, split) rows of a split CSV with a header naming a ``split`` column."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or "split" not in header:
            raise DataError(f"split CSV {path} needs a header with a 'split' column")
        col = header.index("split")
        return [(row[0], row[col]) for row in reader if len(row) > col]


def index_images(folder: Path, recursive: bool, problems: list[str] | None = None) -> dict[str, Path]:
    """Map file stem (relative path without suffix, for trees) -> image path.

    Problems are appended to ``problems``, or raised as :class:`DataError` without it."""
    found: dict[str, Path] = {}
    issues = problems if problems is not None else []
    if not folder.is_dir():
        issues.append(f"folder {folder} does not exist")
    else:
        for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            stem = str(path.relative_to(folder).with_suffix(""))
            if stem in found:
                issues.append(f"two images with the same stem in {folder}: {found[stem].name} and {path.name}")
            found[stem] = path
        if not found:
            issues.append(f"folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if problems is None and issues:
        raise DataError(issues[0])
    return found


def pair_problems(opt: dict[str, Path], sar: dict[str, Path], folders: dict[str, Path]) -> list[str]:
    """One problem per image whose counterpart of the same stem is missing."""
    problems = []
    for have, other, side in ((opt, sar, "sar"), (sar, opt, "opt")):
        problems += [f"incomplete pair: {have[s]} has no counterpart in {folders[side]}"
                     for s in sorted(set(have) - set(other))]
    return problems


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
    """Images on disk in the folder or reference layout (see :class:`SourceConfig`), with
    band picks and optional tiling of large scenes into ``tile``-pixel samples."""

    def __init__(self, cfg: SourceConfig, channels: dict[str, int], data_root: str = "") -> None:
        self.cfg = cfg
        self.name = source_name(cfg)
        self.channels = channels
        listing = list_source(cfg, source_root(cfg, data_root))
        if listing.problems:
            more = len(listing.problems) - 1
            raise DataError(listing.problems[0] + (f" (and {more} more; `codemae data check` lists them)"
                                                   if more else ""))
        self.modalities = listing.modalities
        self.files = listing.files
        self.tiles = self._tiles(listing) if cfg.tile else [(i, 0, 0) for i in range(len(listing.files))]
        self.stems = [listing.stems[i] + (f"@{y}_{x}" if cfg.tile else "") for i, y, x in self.tiles]

    def _tiles(self, listing: Listing) -> list[tuple[int, int, int]]:
        """(file, top, left) of every full tile, from the image headers."""
        size = self.cfg.tile
        tiles = []
        for i, files in enumerate(listing.files):
            header = read_header(files[self.modalities[0]])
            tiles += [(i, y, x) for y in range(0, max(header.height - size, 0) + 1, size)
                      for x in range(0, max(header.width - size, 0) + 1, size)]
        return tiles

    def __len__(self) -> int:
        return len(self.tiles)

    def load(self, index: int) -> dict[str, np.ndarray]:
        file, top, left = self.tiles[index]
        files = self.files[file]
        arrays = {m: load_source_image(self.cfg, self.channels, m, path) for m, path in files.items()}
        if self.paired and arrays["opt"].shape[:2] != arrays["sar"].shape[:2]:
            raise DataError(
                f"pair '{self.stems[index]}': optical {files['opt']} is {_size(arrays['opt'])} "
                f"but SAR {files['sar']} is {_size(arrays['sar'])}"
            )
        if self.cfg.tile:
            arrays = {m: a[top : top + self.cfg.tile, left : left + self.cfg.tile] for m, a in arrays.items()}
        return arrays

class SyntheticSource(Source):
    """Generated paired scenes (see :mod:`codemae.data.synthetic`), scene ``i`` seeded by ``seed + i``."""

    modalities = ("opt", "sar")

    def __init__(self, cfg: SourceConfig, channels: dict[str, int]) -> None:
        self.cfg = cfg
        self.name = source_name(cfg)
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


def load_source_image(cfg: SourceConfig, channels: dict[str, int], modality: str, path: Path | bytes,
                      name: str | None = None) -> np.ndarray:
    """One image of ``modality`` (a path, or bytes called ``name``) as [0, 1] values with the
    source's band picks, the configured channel count and the source's scaling."""
    raw = read_image(path, name)
    label = name or str(path)
    picks = getattr(cfg, f"{modality}_bands")
    bands = band_indices(picks, getattr(cfg, f"{modality}_band_names"), raw.shape[2], label) if picks else None
    return unit_array(raw, getattr(cfg, SCALING_KEYS[modality]), channels[modality], label,
                      CHANNEL_KEYS[modality], bands)


def build_source(cfg: SourceConfig, channels: dict[str, int], data_root: str = "") -> Source:
    if cfg.kind == "synthetic":
        source: Source = SyntheticSource(cfg, channels)
    else:
        source = FolderSource(cfg, channels, data_root)
    if len(source) == 0:
        raise DataError(f"source '{source.name}': no samples (root {cfg.root or '-'}, split {cfg.split})")
    return source


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"
