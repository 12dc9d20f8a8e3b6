"""Which samples train, validate and test an evaluation: a dataset's own split or the fallback re-split.

A split part is either a folder (loaded like ``--data``) or a split-list file (one sample per line,
blank lines and ``#`` comments skipped) naming samples of ``--data`` by their path relative to it
(``2S1/HB14931.jpeg``), their stem (``2S1/HB14931``) or, when unambiguous, their file name. The parts
are joined into one labelled set (classes matched by name) whose index ranges are the split.
Without any given part, the fixed stratified 60/20/20 re-split (seed 0) of ``--data`` is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from codemae.data.readers import IMAGE_SUFFIXES
from codemae.data.sources import Source
from codemae.errors import ConfigError, DataError
from codemae.eval.data import LabelledSet, split_indices
from codemae.eval.split_lists import read_split_list

RESPLIT = {"pool": 0.6, "val": 0.2, "test": 0.2}
PARTS = ("train", "val", "test")


@dataclass
class Split:
    """Indices into a labelled set; ``val`` may be empty (no validation split given)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    kind: str                                            # "given" or "re-split"
    given: dict[str, str] = field(default_factory=dict)  # part -> the folder or list it came from

    def describe(self) -> str:
        sizes = f"train {len(self.train)} / val {len(self.val)} / test {len(self.test)}"
        if self.kind == "given":
            return f"given split ({', '.join(f'--{p} {v}' for p, v in self.given.items())}): {sizes}"
        return f"stratified re-split 60/20/20 of --data (seed 0; no --train/--test given): {sizes}"

    def as_json(self) -> dict:
        return {"kind": self.kind, "given": self.given,
                "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)}}


def resplit(data: LabelledSet) -> Split:
    parts = split_indices(data.labels, RESPLIT)
    return Split(parts["pool"], parts["val"], parts["test"], "re-split")


def list_indices(entries: list[str], stems: list[str], path: Path, data_root: str, flag: str = "--data"
                 ) -> np.ndarray:
    """Indices (in list order) of the samples the entries name; an unknown, ambiguous or repeated name
    is an error naming the list, the entry and the folder (``flag``: the option that gave it)."""
    if not entries:
        raise DataError(f"split list {path} is empty")
    index = {s: i for i, s in enumerate(stems)}
    by_name: dict[str, list[int]] = {}
    for i, s in enumerate(stems):
        by_name.setdefault(s.rsplit("/", 1)[-1], []).append(i)
    picked, missing = [], []
    for entry in entries:
        name = entry.replace("\\", "/").removeprefix("./")
        stem = name.rsplit(".", 1)[0] if Path(name).suffix.lower() in IMAGE_SUFFIXES else name
        matches = [index[stem]] if stem in index else by_name.get(stem, []) if "/" not in stem else []
        if len(matches) > 1:
            raise DataError(f"split list {path}: '{entry}' names {len(matches)} samples of {flag} {data_root}; "
                            f"give its path relative to {flag}")
        if matches:
            picked.append(matches[0])
        else:
            missing.append(entry)
    if missing:
        raise DataError(f"split list {path}: '{missing[0]}' is not in {flag} {data_root} "
                        f"({len(missing)} of {len(entries)} names absent)")
    seen: set[int] = set()
    for entry, i in zip(entries, picked):
        if i in seen:
            raise DataError(f"split list {path}: '{entry}' is listed twice")
        seen.add(i)
    return np.array(picked, dtype=np.int64)


def check_disjoint(from_list: dict[str, np.ndarray], given: dict[str, str], stems: list[str]) -> None:
    """No sample may be named by two split lists (a test image in training would leak)."""
    names = list(from_list)
    for a, first in enumerate(names):
        earlier = set(from_list[first].tolist())
        for second in names[a + 1:]:
            shared = [i for i in from_list[second].tolist() if i in earlier]
            if shared:
                raise DataError(f"split list {given[second]} (--{second}) names '{stems[shared[0]]}', also in "
                                f"{given[first]} (--{first}); {len(shared)} shared")


def check_no_shared_files(parts: dict[str, tuple[Source, np.ndarray]], given: dict[str, str]) -> None:
    """No image file may be in two split parts (a folder given twice, or a folder holding an image that
    a split list of ``--data`` also names); generated or tiled sources have no files to compare."""
    owner: dict[Path, str] = {}
    for part, (source, idx) in parts.items():
        files = getattr(source, "files", None)
        if files is None or len(files) != len(source):
            continue
        paths = [Path(next(iter(files[i].values()))).resolve() for i in idx]
        shared = [k for k, path in enumerate(paths) if path in owner]
        if shared:
            other = owner[paths[shared[0]]]
            raise DataError(f"--{part} {given[part]} holds '{source.stems[idx[shared[0]]]}', also in "
                            f"--{other} {given[other]}; {len(shared)} shared")
        owner.update(dict.fromkeys(paths, part))


class JoinedSource(Source):
    """Chosen samples of several sources, one after the other."""

    def __init__(self, parts: list[tuple[Source, np.ndarray]]) -> None:
        self.parts = parts
        self.name = "+".join(dict.fromkeys(s.name for s, _ in parts))
        self.modalities = tuple(m for m in parts[0][0].modalities if all(m in s.modalities for s, _ in parts))
        self.where = [(k, int(i)) for k, (_, idx) in enumerate(parts) for i in idx]
        self.stems = [parts[k][0].stems[i] for k, i in self.where]

    def __len__(self) -> int:
        return len(self.where)

    def load(self, index: int) -> dict[str, np.ndarray]:
        k, i = self.where[index]
        return self.parts[k][0].load(i)


def joined_labels(parts: list[tuple[LabelledSet, np.ndarray]]) -> tuple[np.ndarray, list[str]]:
    """The parts' labels with their classes matched by name (sorted union of the class names)."""
    if len({data.multilabel for data, _ in parts}) > 1:
        raise DataError("the split parts mix single-label and multi-label data")
    classes = sorted({c for data, _ in parts for c in data.classes})
    blocks = []
    for data, idx in parts:
        remap = np.array([classes.index(c) for c in data.classes], dtype=np.int64)
        if data.multilabel:
            hot = np.zeros((len(idx), len(classes)), dtype=np.float32)
            hot[:, remap] = data.labels[idx]
            blocks.append(hot)
        else:
            blocks.append(remap[data.labels[idx]])
    return np.concatenate(blocks), classes


def given_split(load: Callable[[str], LabelledSet], data_root: str | None, given: dict[str, str]
                ) -> tuple[LabelledSet, Split]:
    """The labelled set and split of the given parts; ``load(root)`` reads a folder (or ``--data``)."""
    if "train" not in given or "test" not in given:
        raise ConfigError("give both --train and --test (and optionally --val), or none of them for the re-split")
    order = [p for p in PARTS if p in given]
    base, parts, from_list = None, [], {}
    for part in order:
        path = Path(given[part])
        if path.is_dir():
            data = load(str(path))
            parts.append((data, np.arange(len(data.labels))))
        elif path.is_file():
            if data_root is None:
                raise ConfigError(f"--{part} {path} is a split list: give --data, the folder its names are in")
            base = base or load(data_root)
            from_list[part] = list_indices(read_split_list(path), base.source.stems, path, data_root)
            parts.append((base, from_list[part]))
        else:
            raise DataError(f"--{part} {path}: neither a folder nor a split-list file")
    if base is not None:
        check_disjoint(from_list, given, base.source.stems)
    check_no_shared_files({p: (d.source, idx) for p, (d, idx) in zip(order, parts)}, given)
    labels, classes = joined_labels(parts)
    data = LabelledSet(JoinedSource([(d.source, idx) for d, idx in parts]), labels, classes)
    bounds = np.cumsum([0] + [len(idx) for _, idx in parts])
    ranges = {p: np.arange(bounds[k], bounds[k + 1]) for k, p in enumerate(order)}
    return data, Split(ranges["train"], ranges.get("val", np.zeros(0, dtype=np.int64)), ranges["test"], "given",
                       {p: given[p] for p in order})


def write_split_lists(data: LabelledSet, root: str | Path, fractions: dict[str, float], seed: int,
                      out: str | Path) -> dict[str, Path]:
    """A fixed, seeded, class-stratified split of a class-folder tree written as split lists
    ``<out>/<part>.txt`` of image paths relative to ``root`` (parts with a zero fraction are skipped)."""
    parts = split_indices(data.labels, {p: f for p, f in fractions.items() if f > 0}, seed)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    files = getattr(data.source, "files", None)
    written = {}
    for part, idx in parts.items():
        names = [str(Path(next(iter(files[i].values()))).relative_to(root)) if files else data.source.stems[i]
                 for i in idx]
        written[part] = folder / f"{part}.txt"
        written[part].write_text("".join(f"{n}\n" for n in names))
    return written
