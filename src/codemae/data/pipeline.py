"""From the ``data`` config to a DataLoader of batch dicts."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from codemae.config import Config, SourceConfig
from codemae.data.sampling import HomogeneousBatchSampler, Part, Pools
from codemae.data.shards import ShardStream, shard_sources
from codemae.data.sources import MAX_CONSECUTIVE_SKIPS, Source, build_source
from codemae.data.stats import compute_stats, load_stats, save_stats
from codemae.data.teacher_cache import TeacherFeatureCache
from codemae.data.transforms import Normalisation, PairedCrop
from codemae.errors import ConfigError, DataError
from codemae.models.backbone import MODALITIES

log = logging.getLogger(__name__)


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
        tries = min(MAX_CONSECUTIVE_SKIPS, len(source))
        for skipped in range(tries):
            try:
                return local, source.load(local), skipped
            except DataError as err:
                if self.on_error == "raise":
                    raise
                log.warning("skipped an unreadable sample (data.on_error=skip): %s", err)
                last = err
                local = (local + 1) % len(source)
        raise DataError(f"source '{source.name}': {tries} unreadable samples in a row, "
                        f"the last: {last}")

    def pools(self, weights: list[float] | None = None) -> Pools:
        """Each source's indices under its kind, with its mixture weight (1 if not given)."""
        weights = weights or [1.0] * len(self.sources)
        by_kind: dict[tuple[str, ...], list[Part]] = {("opt", "sar"): [], ("opt",): [], ("sar",): []}
        for k, source in enumerate(self.sources):
            by_kind[source.modalities].append(Part(np.arange(self.offsets[k], self.offsets[k + 1]), weights[k]))
        return Pools(*(tuple(by_kind[kind]) for kind in (("opt", "sar"), ("opt",), ("sar",))))


def collate(items: list[dict[str, Tensor]]) -> dict:
    """Stack samples into ``{"opt", "sar", "paired", ...}``; an absent modality is None.

    An unpaired batch holds optical-only and SAR-only samples; each key stacks the
    samples that have it.
    """
    batch: dict = {"paired": all("opt" in item and "sar" in item for item in items)}
    for key in dict.fromkeys(k for item in items for k in item):
        batch[key] = torch.stack([item[key] for item in items if key in item])
    for m in MODALITIES:
        batch.setdefault(m, None)
    return batch


def source_stats(source: Source, cfg: SourceConfig, cache: Path, samples: int, write: bool,
                 skip_unreadable: bool = False) -> dict[str, Normalisation]:
    """Normalisation of one source: given in the config, from a stats file, none, or computed
    once and cached in the run folder."""
    if cfg.stats == "none":
        return {m: Normalisation([0.0], [1.0]) for m in source.modalities}
    if cfg.stats == "given":
        return {m: Normalisation(getattr(cfg.given, f"{m}_mean"), getattr(cfg.given, f"{m}_std"))
                for m in source.modalities}
    if cfg.stats != "auto":
        return load_stats(Path(cfg.stats), source.modalities)
    if cache.is_file():
        return load_stats(cache, source.modalities)
    log.info("computing normalisation statistics of source '%s' over up to %d samples", source.name, samples)
    stats = compute_stats(source, samples, skip_unreadable=skip_unreadable)
    if write:
        save_stats(stats, cache, min(samples, len(source)))
    return stats


def build_sources(cfg: Config) -> list[Source]:
    """The configured sources, listed and checked (unique names, files present)."""
    if not cfg.data.sources:
        raise ConfigError("config key 'data.sources': no data source given")
    channels = {"opt": cfg.model.opt_channels, "sar": cfg.model.sar_channels}
    sources = [build_source(s, channels, cfg.data.root) for s in cfg.data.sources]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'data.sources': source names must be unique, got {names}")
    return sources


def build_dataset(cfg: Config, run_dir: Path, write_stats: bool = True) -> PretrainDataset:
    """Sources with their per-source normalisation, the shared augmentation settings,
    and the teacher feature caches when OKD reads from one."""
    sources = build_sources(cfg)
    transforms = []
    for source_cfg, source in zip(cfg.data.sources, sources):
        norms = source_stats(source, source_cfg, run_dir / "stats" / f"{source.name}.json",
                             cfg.data.stats_samples, write_stats, cfg.data.on_error == "skip")
        transforms.append(PairedCrop(cfg.model.img_size, cfg.data.crop_scale, cfg.data.crop_ratio,
                                     cfg.data.hflip, norms))
    caches = None
    if cfg.method.okd and cfg.method.teacher.cache:
        caches = [TeacherFeatureCache(cfg.method.teacher.cache, s) if "opt" in s.modalities else None for s in sources]
    return PretrainDataset(sources, transforms, caches, cfg.model.img_size // cfg.model.patch_size,
                           cfg.data.on_error)


def build_training_data(cfg: Config, run_dir: Path, world_size: int, rank: int, write_stats: bool
                        ) -> tuple[DataLoader, HomogeneousBatchSampler | ShardStream, set[str]]:
    """The training loader, its epoch schedule (``len``, ``set_epoch``) and the source kinds in use.

    Folder and synthetic sources load by index through a batch sampler; shard sets stream.
    """
    layouts = {s.layout == "shards" for s in cfg.data.sources}
    if layouts == {True}:
        if cfg.method.okd and cfg.method.teacher.cache:
            raise ConfigError("config key 'method.teacher.cache': the teacher feature cache reads folder sources "
                              "by index; with shards, run the teacher live (leave the cache empty)")
        stream = ShardStream(*shard_sources(cfg), cfg, world_size, rank)
        if cfg.method.name == "fusmae" and stream.kinds() != {"paired"}:
            raise ConfigError("config key 'data.sources': Fus-MAE fuses the two images of a pair and needs paired "
                              f"sources only; these shards hold {sorted(stream.kinds())}")
        loader = DataLoader(stream, batch_size=None, num_workers=cfg.data.num_workers,
                            pin_memory=torch.cuda.is_available())
        return loader, stream, stream.kinds()
    if len(layouts) > 1:
        raise ConfigError("config key 'data.sources': shard sets stream and cannot be mixed with folder sources; "
                          "shard every source (codemae shard) or none")
    dataset = build_dataset(cfg, run_dir, write_stats)
    loader = build_loader(cfg, dataset, world_size, rank)
    return loader, loader.batch_sampler, {s.kind for s in cfg.data.sources}


def build_loader(cfg: Config, dataset: PretrainDataset, world_size: int, rank: int) -> DataLoader:
    pools = dataset.pools([s.weight for s in cfg.data.sources])
    sampler = HomogeneousBatchSampler(pools, cfg.data.batch_size, world_size, rank, cfg.seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
