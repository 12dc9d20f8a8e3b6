"""WebDataset shards: the manifest, and streaming shards into training.

``codemae shard`` (:mod:`codemae.data.shard_writer`) turns each folder source into tar shards of ``samples_per_shard``
samples (paired and unpaired sources never share a shard) and writes a manifest
with the per-source statistics, every shard's sample count, size and SHA-256. A
sample is the source's original file bytes (``<key>.opt.<ext>``, ``<key>.sar.<ext>``)
and, for tiled sources, ``<key>.json`` with the tile box, so the source's own band
picks and scaling decode it exactly as from the folder.

:class:`ShardStream` reads them as an ``IterableDataset`` of whole batches. Every
epoch, every rank and every loader worker derive the same plan from (seed, epoch):
each kind's shards shuffled (mixture weights repeat or subsample shards) and dealt
to the ``ranks x workers`` slots so each slot gets a near-equal sample count; a
sequence of rounds, each entirely paired or unpaired, as many as the smallest slot
can fill. In a round each worker of each rank yields one batch (the DataLoader takes
workers in turn), so all ranks run the same kind at the same step. Samples pass a
seeded shuffle buffer; the remainder a slot cannot fill a round with is left for
that epoch. Memory holds the manifest's shard list and one buffer per stream, never
a per-sample index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from codemae.batch import Geometry, collate
from codemae.config import DataConfig, SourceConfig, from_dict, shown
from codemae.data.listing import safe_name, source_root
from codemae.data.sampling import Part
from codemae.data.skipping import retry_readable
from codemae.data.sources import load_source_image
from codemae.data.transforms import Normalisation, PairedCrop
from codemae.errors import DataError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = "codemae-shards"
KINDS = ("paired", "opt", "sar")


@dataclass(frozen=True)
class Shard:
    path: str  # relative to the manifest's folder or URL
    samples: int
    bytes: int
    sha256: str


@dataclass
class ShardedSource:
    """One source of a shard set, as its manifest describes it."""

    name: str
    kind: str
    modalities: tuple[str, ...]
    samples: int
    source: SourceConfig
    stats: dict[str, Normalisation]
    shards: list[Shard]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_url(root: str) -> bool:
    """Whether a shard root is a URL (``https://``, ``gs://``, ``pipe:cmd``...) rather than a folder."""
    return "://" in root or root.startswith("pipe:")


def shard_root(cfg: SourceConfig, data_root: str) -> str:
    """A shard source's root: a URL as given, a folder resolved against ``data.root``."""
    return cfg.root if is_url(cfg.root) else str(source_root(cfg, data_root))


def join(root: str, relative: str) -> str:
    return f"{root.rstrip('/')}/{relative}" if is_url(root) else str(Path(root) / relative)


def open_url(url: str):
    """A binary stream of a local path or any URL WebDataset's ``gopen`` handles (http(s), pipe:, gs://...)."""
    from webdataset.gopen import gopen

    try:
        return gopen(url, "rb")
    except Exception as err:  # gopen raises OSError, ValueError or a subprocess error per scheme
        raise DataError(f"{url}: cannot open ({err})") from err


MAX_MANIFEST_BYTES = 256 << 20
MAX_MEMBER_BYTES = 1 << 30  # one image file inside a shard; a member declaring more is refused unread
MAX_SHARD_SAMPLES = 10_000_000
SAFE_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
SHA256 = re.compile(r"[0-9a-f]{64}")


def checked_shard(entry: dict, source: str, url: str) -> Shard:
    """A manifest's shard entry, refused unless its path stays inside the shard set (relative, plain
    characters: no ``..``, no shell syntax, so it can never escape the folder or a ``pipe:`` command)
    and its counts and checksum are well-formed."""
    shard = Shard(**entry)
    if not (isinstance(shard.path, str) and SAFE_PATH.fullmatch(shard.path) and ".." not in shard.path.split("/")):
        raise DataError(f"{url}: source '{source}': shard path {shown(shard.path)} is not a plain relative path "
                        "inside the shard set")
    if not (isinstance(shard.samples, int) and 0 < shard.samples <= MAX_SHARD_SAMPLES):
        raise DataError(f"{url}: shard {shard.path}: sample count {shown(shard.samples)} is not in "
                        f"[1, {MAX_SHARD_SAMPLES}]")
    if not (isinstance(shard.bytes, int) and shard.bytes > 0 and isinstance(shard.sha256, str)
            and SHA256.fullmatch(shard.sha256)):
        raise DataError(f"{url}: shard {shard.path}: size or SHA-256 malformed")
    return shard


def read_manifest(root: str) -> list[ShardedSource]:
    url = join(root, MANIFEST)
    try:
        with open_url(url) as f:
            text = f.read(MAX_MANIFEST_BYTES + 1)
        if len(text) > MAX_MANIFEST_BYTES:
            raise DataError(f"{url}: larger than {MAX_MANIFEST_BYTES} bytes, not a shard manifest")
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"{url}: not a codemae shard manifest")
        sources = []
        for e in data["sources"]:
            name = safe_name(e["name"], f"{url}: source name")
            expected = ("opt", "sar") if e["kind"] == "paired" else (e["kind"],)
            if e["kind"] not in KINDS or tuple(e["modalities"]) != expected or set(e["stats"]) - set(expected):
                raise DataError(f"{url}: source '{name}': kind {shown(e['kind'])} with modalities "
                                f"{shown(e['modalities'])} is not a codemae source (paired: opt and sar; opt; sar)")
            shards = [checked_shard(s, name, url) for s in e["shards"]]
            if sum(s.samples for s in shards) != e["samples"]:
                raise DataError(f"{url}: source '{name}': its shards hold {sum(s.samples for s in shards)} samples, "
                                f"the manifest says {shown(e['samples'])}")
            sources.append(ShardedSource(name, e["kind"], tuple(e["modalities"]), e["samples"],
                                         from_dict(SourceConfig, e["source"], "source"),
                                         {m: Normalisation(**s) for m, s in e["stats"].items()}, shards))
        return sources
    except RecursionError as err:
        raise DataError(f"{url}: nested too deeply to be a shard manifest") from err
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{url}: malformed shard manifest ({shown(str(err))})") from err


class HashingReader:
    """A binary stream that feeds every byte read through SHA-256."""

    def __init__(self, stream) -> None:  # noqa: ANN001 (any binary stream)
        self.stream, self.digest = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def hexdigest(self) -> str:
        while self.read(1 << 20):  # the tar's end padding, and anything after it
            pass
        return self.digest.hexdigest()


def iter_records(url: str, sha256: str | None = None) -> Iterator[dict[str, bytes]]:
    """The records of one shard in order: {"__key__", "<ext>": bytes, ...}; a broken tar names the shard.

    A member declaring more than ``MAX_MEMBER_BYTES`` is refused before it is read. With ``sha256``
    the shard's bytes are checked as they stream: a shard replaced by another (even of the same
    size) is an error when its end is reached, before the next shard is read.
    """
    with open_url(url) as raw:
        stream = HashingReader(raw)
        record: dict[str, bytes] = {}
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isreg():
                        continue
                    if member.size > MAX_MEMBER_BYTES:
                        raise DataError(f"shard {url}: member {shown(member.name)} declares {member.size} bytes, "
                                        f"over the {MAX_MEMBER_BYTES}-byte limit")
                    key, _, ext = Path(member.name).name.partition(".")
                    if record and key != record["__key__"]:
                        yield record
                        record = {}
                    record["__key__"] = key
                    record[ext] = tar.extractfile(member).read()
            digest = stream.hexdigest() if sha256 else None
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"shard {url}: corrupt tar ({err}) after record '{record.get('__key__')}'") from err
        if record:
            yield record
        if sha256 and digest != sha256:
            raise DataError(f"shard {url}: SHA-256 differs from the manifest's (replaced or corrupted); "
                            "re-shard or restore it")


def decode_record(record: dict[str, bytes], source: ShardedSource, channels: dict[str, int], url: str
                  ) -> dict[str, np.ndarray]:
    """A record's arrays in [0, 1], decoded with the source's band picks and scaling (tile cut out)."""
    arrays = {}
    for m in source.modalities:
        member = next((ext for ext in record if ext.startswith(f"{m}.")), None)
        name = f"{url}:{record['__key__']}.{member or m}"
        if member is None:
            raise DataError(f"{name}: record has no {m} image")
        arrays[m] = load_source_image(source.source, channels, m, record[member], name)
    if "json" in record:
        try:
            top, left, size = (int(v) for v in json.loads(record["json"])["tile"])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{url}:{record['__key__']}: malformed tile record") from err
        arrays = {m: a[top : top + size, left : left + size] for m, a in arrays.items()}
    if len({a.shape[:2] for a in arrays.values()}) > 1:
        raise DataError(f"{url}:{record['__key__']}: optical and SAR sizes differ")
    return arrays


@dataclass(frozen=True)
class Slot:
    """One (rank, worker) reader's share of an epoch: shard indices per kind."""

    shards: dict[str, list[int]]
    samples: dict[str, int]


class ShardStream(IterableDataset):
    """Batches from shard sets (see the module docstring); ``len()`` is steps per epoch per rank.

    A batch is what :func:`~codemae.batch.collate` makes, plus ``id``: (source, sample
    index) per sample, and ``skipped``: unreadable records passed over (``data.on_error=skip``).
    """

    def __init__(self, sources: list[ShardedSource], roots: list[str], weights: list[float], data: DataConfig,
                 geometry: Geometry, seed: int = 0, world_size: int = 1, rank: int = 0) -> None:
        self.sources, self.roots, self.weights = sources, roots, weights
        self.batch_size = data.batch_size
        self.buffer = data.shuffle_buffer
        self.on_error = data.on_error
        self.seed = seed
        self.world_size, self.rank = world_size, rank
        self.workers = max(1, data.num_workers)
        self.channels = geometry.channels
        self.transforms = [PairedCrop(geometry.img_size, data.crop_scale, data.crop_ratio, data.hflip, s.stats)
                           for s in sources]
        # all shards, flattened: (source index, shard); kinds index into this list
        self.shards = [(k, shard) for k, s in enumerate(sources) for shard in s.shards]
        self.source_shards = [np.array([i for i, (k, _) in enumerate(self.shards) if k == src], dtype=np.int64)
                              for src in range(len(sources))]
        self.epoch, self.start = 0, 0
        if len(self) == 0:
            raise DataError(f"shards too few or too small for one step: {len(self.shards)} shards over "
                            f"{world_size} processes x {self.workers} workers at batch {self.batch_size}; "
                            "re-shard with fewer samples per shard")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def kinds(self) -> set[str]:
        return {s.kind for s in self.sources}

    def plan(self, epoch: int) -> tuple[list[Slot], list[bool]]:
        """Every slot's shards and the epoch's round kinds (True: paired); the same on every rank and worker."""
        rng = np.random.default_rng([self.seed, epoch, 7])
        slots = self.world_size * self.workers
        dealt = [{kind: [] for kind in KINDS} for _ in range(slots)]
        counts = np.zeros((slots, len(KINDS)), dtype=np.int64)
        for j, kind in enumerate(KINDS):
            parts = [Part(self.source_shards[src], self.weights[src])
                     for src, s in enumerate(self.sources) if s.kind == kind]
            drawn = [i for part in parts for i in part.draw(rng).tolist()]
            for i in rng.permutation(np.array(drawn, dtype=np.int64)).tolist():
                slot = int(np.argmin(counts[:, j]))  # deal to the emptiest slot: near-equal sample counts
                dealt[slot][kind].append(i)
                counts[slot, j] += self.shards[i][1].samples
        b = self.batch_size
        paired = int(counts[:, 0].min()) // b
        unpaired = 0
        present = [j for j in (1, 2) if counts[:, j].any()]
        if present and counts[:, present].min() > 0:  # every slot reads every unpaired modality there is
            unpaired = int(counts[:, present].max(axis=1).min()) // b
        elif present:
            log.warning("unpaired shards too few to give each of %d readers both modalities; unpaired data unused "
                        "this epoch (re-shard with fewer samples per shard)", slots)
        rounds = rng.permutation(np.array([True] * paired + [False] * unpaired, dtype=bool)).tolist()
        return [Slot(d, {kind: int(counts[s, j]) for j, kind in enumerate(KINDS)}) for s, d in enumerate(dealt)], rounds

    def __len__(self) -> int:
        return len(self.plan(0)[1]) * self.workers

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        # the DataLoader takes workers in turn from worker 0, so after resuming at step ``start`` worker w
        # reads the share whose batches are steps start + w, start + w + W, ... (its "lane")
        lane = ((info.id if info is not None else 0) + self.start) % self.workers
        slot_id = self.rank * self.workers + lane
        slots, rounds = self.plan(self.epoch)
        slot = slots[slot_id]
        rng = np.random.default_rng([self.seed, self.epoch, slot_id])
        streams = {kind: self.records(slot.shards[kind], np.random.default_rng([self.seed, self.epoch, slot_id, j]))
                   for j, kind in enumerate(KINDS) if slot.shards[kind]}
        unpaired_kinds = [k for k in ("opt", "sar") if k in self.kinds()]
        for r, paired in enumerate(rounds):
            skip = r * self.workers + lane < self.start  # resuming mid-epoch: consume without decoding
            kinds = ["paired"] if paired else unpaired_kinds
            items, skipped = [], 0
            for kind in kinds:
                for _ in range(self.batch_size):
                    seed = int(rng.integers(0, 2**62))
                    if skip:
                        next(streams[kind])
                        continue
                    sample, bad = self.sample(streams[kind], seed)
                    items.append(sample)
                    skipped += bad
            if not skip:
                yield collate(items) | {"skipped": torch.tensor([skipped])}

    def records(self, shards: list[int], rng: np.random.Generator) -> Iterator[tuple[int, str, dict]]:
        """Endless (source, url, record) stream over ``shards``, each pass through a shuffle buffer that
        is drained before the next pass begins (passes repeat only for the smaller unpaired modality, or
        a stream short of samples after skipped corruption)."""
        while True:
            buffer: list[tuple[int, str, dict]] = []
            for item in self.one_pass(shards):
                buffer.append(item)
                if len(buffer) >= self.buffer:
                    yield self._pop_random(buffer, rng)
            while buffer:
                yield self._pop_random(buffer, rng)

    @staticmethod
    def _pop_random(buffer: list, rng: np.random.Generator):
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        return buffer.pop()

    def one_pass(self, shards: list[int]) -> Iterator[tuple[int, str, dict]]:
        """Every record of ``shards`` in order, checking each shard's count against the manifest."""
        for i in shards:
            k, shard = self.shards[i]
            url = join(self.roots[k], shard.path)
            seen = 0
            try:
                for record in iter_records(url, shard.sha256):
                    seen += 1
                    yield k, url, record
            except DataError as err:
                if self.on_error == "raise":
                    raise
                log.warning("skipped the rest of a shard (data.on_error=skip): %s", err)
            if seen != shard.samples and self.on_error == "raise":
                raise DataError(f"shard {url}: {seen} samples, the manifest says {shard.samples} "
                                "(truncated or replaced?)")

    def sample(self, stream: Iterator[tuple[int, str, dict]], seed: int) -> tuple[dict, int]:
        """The next decodable sample, augmented with ``seed``; with on_error=skip, bad records are counted."""
        def attempt(_: int) -> tuple[int, int, dict]:
            k, url, record = next(stream)
            if not record["__key__"].isdigit():
                raise DataError(f"{url}: record key {shown(record['__key__'])} is not a sample number")
            return k, int(record["__key__"]), decode_record(record, self.sources[k], self.channels, url)

        (k, index, arrays), bad = retry_readable(attempt, self.on_error, "shard stream")
        sample, _ = self.transforms[k](arrays, torch.Generator().manual_seed(seed))
        sample["id"] = torch.tensor([k, index])  # (source, sample index) for tracing
        return sample, bad


def shard_sources(data: DataConfig) -> tuple[list[ShardedSource], list[str], list[float]]:
    """The configured shard sets' sources (``dataset`` picks one source of a set), roots and weights
    (each source's weight when it was sharded, times the shard-set entry's weight)."""
    sources, roots, weights = [], [], []
    for source_cfg in data.sources:
        root = shard_root(source_cfg, data.root)
        for sharded in read_manifest(root):
            if source_cfg.dataset and sharded.name != source_cfg.dataset:
                continue
            sources.append(sharded)
            roots.append(root)
            weights.append(source_cfg.weight * sharded.source.weight)  # the set's entry scales the stored weights
    if not sources:
        raise DataError("no shard sources found in the configured manifests")
    return sources, roots, weights
