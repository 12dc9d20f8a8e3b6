"""Listing a source's tree: its files per modality and split, and every problem with them,
before any pixel is read (so ``codemae data check`` reports every problem at once)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from codemae.config import SourceConfig, shown
from codemae.data.readers import IMAGE_SUFFIXES
from codemae.errors import ConfigError, DataError

REFERENCE_FOLDERS = {"opt": "RGB", "sar": "SAR"}  # <root>/<dataset>/{RGB,SAR}/<name>.png


def source_modalities(cfg: SourceConfig) -> tuple[str, ...]:
    return ("opt", "sar") if cfg.kind in ("paired", "synthetic") else (cfg.kind,)


SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def safe_name(name: object, what: str) -> str:
    """``name`` if it can name a file in a folder (letters, digits, ``._-``; no separators, no ``..``)."""
    if not (isinstance(name, str) and SAFE_NAME.fullmatch(name) and ".." not in name):
        raise ConfigError(f"{what} {shown(name)}: use letters, digits, '.', '_' and '-' only (it names files)")
    return name


def source_name(cfg: SourceConfig) -> str:
    """The source's name (given, its dataset's, or its folder's): it names its statistics cache, shard folder
    and teacher cache, so it must be a plain file name."""
    return safe_name(cfg.name or cfg.dataset or Path(cfg.root).name or "synthetic", "source name")


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
