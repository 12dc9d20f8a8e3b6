"""From the ``data`` config to a DataLoader of batch dicts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from codemae.batch import Geometry, collate
from codemae.config import DataConfig, SourceConfig, to_dict
from codemae.data.sampling import HomogeneousBatchSampler, Part, Pools
from codemae.data.shards import ShardStream, shard_sources
from codemae.data.skipping import MAX_CONSECUTIVE_SKIPS, retry_readable
from codemae.data.sources import Source, build_source
from codemae.data.stats import FINGERPRINT_LENGTH, source_stats
from codemae.data.teacher_cache import TeacherFeatureCache
from codemae.data.transforms import PairedCrop
from codemae.errors import ConfigError

# per source: the reader of its cached teacher features, or None (the caller decides which sources have them)
TeacherFeatures = Callable[[Source], "TeacherFeatureCache | None"]


class PretrainDataset(Dataset):
    """All sources end to end; item ``(index, seed)`` is one augmented sample.

    With teacher caches (one per source, None where absent) an optical sample also
    carries ``teacher_opt``: the cached teacher features resampled to its crop on
    the student's ``grid``.

    ``on_error="skip"``: an unreadable sample is replaced by the next readable one of
    its source (batches keep their size, so ranks stay in step) and counted in the
    sample's ``skipped`` entry; ``"raise"`` lets the error name the file and stop.
    """

    def __init__(self, sources: list[Source], transforms: list[PairedCrop],
                 caches: list[TeacherFeatureCache | None] | None = None, grid: int = 0,
                 on_error: str = "raise") -> None:
        self.sources = sources
        self.transforms = transforms
        self.caches = caches or [None] * len(sources)
        self.grid = grid
        self.on_error = on_error
        self.offsets = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Tensor]:
        index, seed = item
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        local, arrays, skipped = self.load(k, index - int(self.offsets[k]))
        sample, box = self.transforms[k](arrays, torch.Generator().manual_seed(seed))
        if self.caches[k] is not None:
            sample["teacher_opt"] = self.caches[k].crop(local, box, self.grid)
        sample["skipped"] = torch.tensor(skipped)
        return sample

    def load(self, k: int, local: int) -> tuple[int, dict[str, np.ndarray], int]:
        """Sample ``local`` of source ``k`` (or, skipping, the next readable one): (index, arrays, skips)."""
        source = self.sources[k]

        def attempt(skipped: int) -> tuple[int, dict[str, np.ndarray]]:
            index = (local + skipped) % len(source)
            return index, source.load(index)

        (index, arrays), skipped = retry_readable(attempt, self.on_error, f"source '{source.name}'",
                                                  limit=min(MAX_CONSECUTIVE_SKIPS, len(source)))
        return index, arrays, skipped

    def pools(self, weights: list[float] | None = None) -> Pools:
        """Each source's indices under its kind, with its mixture weight (1 if not given)."""
        weights = weights or [1.0] * len(self.sources)
        by_kind: dict[tuple[str, ...], list[Part]] = {("opt", "sar"): [], ("opt",): [], ("sar",): []}
        for k, source in enumerate(self.sources):
            by_kind[source.modalities].append(Part(np.arange(self.offsets[k], self.offsets[k + 1]), weights[k]))
        return Pools(*(tuple(by_kind[kind]) for kind in (("opt", "sar"), ("opt",), ("sar",))))


def build_sources(data: DataConfig, channels: dict[str, int]) -> list[Source]:
    """The configured sources, listed and checked (unique names, files present)."""
    if not data.sources:
        raise ConfigError("config key 'data.sources': no data source given")
    sources = [build_source(s, channels, data.root) for s in data.sources]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'data.sources': source names must be unique, got {names}")
    return sources


def source_fingerprint(source: Source, cfg: SourceConfig) -> str:
    """A short hash of a source's settings and sample list: its statistics cache is reused only for the
    same data (a resumed run whose source changed under the same name computes them again)."""
    digest = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode())
    for stem in source.stems:
        digest.update(stem.encode() + b"\n")
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


def build_dataset(data: DataConfig, geometry: Geometry, run_dir: Path, write_stats: bool = True,
                  teacher_features: TeacherFeatures | None = None) -> PretrainDataset:
    """Sources with their per-source normalisation, the shared augmentation settings, and
    (``teacher_features``) each source's cached teacher features."""
    sources = build_sources(data, geometry.channels)
    transforms = []
    for source_cfg, source in zip(data.sources, sources):
        cache = run_dir / "stats" / f"{source.name}-{source_fingerprint(source, source_cfg)}.json"
        norms = source_stats(source, source_cfg, cache, data.stats_samples, write_stats, data.on_error == "skip")
        transforms.append(PairedCrop(geometry.img_size, data.crop_scale, data.crop_ratio, data.hflip, norms))
    caches = [teacher_features(s) for s in sources] if teacher_features else None
    return PretrainDataset(sources, transforms, caches, geometry.grid, data.on_error)


def source_kinds(data: DataConfig) -> set[str]:
    """The kinds of sample (paired, opt, sar) the configured sources hold; shard sets say in their manifests."""
    if any(s.layout == "shards" for s in data.sources):
        return {s.kind for s in shard_sources(data)[0]}
    return {"paired" if s.kind == "synthetic" else s.kind for s in data.sources}


def build_training_data(data: DataConfig, geometry: Geometry, run_dir: Path, world_size: int, rank: int,
                        write_stats: bool, seed: int = 0, teacher_features: TeacherFeatures | None = None
                        ) -> tuple[DataLoader, HomogeneousBatchSampler | ShardStream]:
    """The training loader and its epoch schedule (``len``, ``set_epoch``).

    Folder and synthetic sources load by index through a batch sampler; shard sets stream.
    """
    layouts = {s.layout == "shards" for s in data.sources}
    if layouts == {True}:
        if teacher_features is not None:
            raise ConfigError("config key 'method.teacher.cache': the teacher feature cache reads folder sources "
                              "by index; with shards, run the teacher live (leave the cache empty)")
        stream = ShardStream(*shard_sources(data), data, geometry, seed, world_size, rank)
        loader = DataLoader(stream, batch_size=None, num_workers=data.num_workers,
                            pin_memory=torch.cuda.is_available())
        return loader, stream
    if len(layouts) > 1:
        raise ConfigError("config key 'data.sources': shard sets stream and cannot be mixed with folder sources; "
                          "shard every source (codemae shard) or none")
    dataset = build_dataset(data, geometry, run_dir, write_stats, teacher_features)
    loader = build_loader(data, dataset, world_size, rank, seed)
    return loader, loader.batch_sampler


def build_loader(data: DataConfig, dataset: PretrainDataset, world_size: int, rank: int, seed: int = 0) -> DataLoader:
    pools = dataset.pools([s.weight for s in data.sources])
    sampler = HomogeneousBatchSampler(pools, data.batch_size, world_size, rank, seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=data.num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
