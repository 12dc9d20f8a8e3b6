"""From the ``data`` config to a DataLoader of batch dicts."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from codemae.config import Config
from codemae.data.sampling import HomogeneousBatchSampler, Pools
from codemae.data.sources import Source, build_source
from codemae.data.stats import compute_stats, load_stats, save_stats
from codemae.data.teacher_cache import TeacherFeatureCache
from codemae.data.transforms import Normalisation, PairedCrop
from codemae.errors import ConfigError
from codemae.models.backbone import MODALITIES

log = logging.getLogger(__name__)


class PretrainDataset(Dataset):
    """All sources end to end; item ``(index, seed)`` is one augmented sample.

    With teacher caches (one per source, None where absent) an optical sample also
    carries ``teacher_opt``: the cached teacher features resampled to its crop on
    the student's ``grid``.
    """

    def __init__(self, sources: list[Source], transforms: list[PairedCrop],
                 caches: list[TeacherFeatureCache | None] | None = None, grid: int = 0) -> None:
        self.sources = sources
        self.transforms = transforms
        self.caches = caches or [None] * len(sources)
        self.grid = grid
        self.offsets = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Tensor]:
        index, seed = item
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        local = index - int(self.offsets[k])
        sample, box = self.transforms[k](self.sources[k].load(local), torch.Generator().manual_seed(seed))
        if self.caches[k] is not None:
            sample["teacher_opt"] = self.caches[k].crop(local, box, self.grid)
        return sample

    def pools(self) -> Pools:
        by_kind: dict[tuple[str, ...], list[np.ndarray]] = {("opt", "sar"): [], ("opt",): [], ("sar",): []}
        for k, source in enumerate(self.sources):
            by_kind[source.modalities].append(np.arange(self.offsets[k], self.offsets[k + 1]))
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
        return Pools(cat(by_kind[("opt", "sar")]), cat(by_kind[("opt",)]), cat(by_kind[("sar",)]))


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


def source_stats(source: Source, setting: str, cache: Path, samples: int, write: bool) -> dict[str, Normalisation]:
    """Normalisation of one source: from a stats file, none, or computed once and cached in the run folder."""
    if setting == "none":
        return {m: Normalisation([0.0], [1.0]) for m in source.modalities}
    if setting != "auto":
        return load_stats(Path(setting), source.modalities)
    if cache.is_file():
        return load_stats(cache, source.modalities)
    log.info("computing normalisation statistics of source '%s' over up to %d samples", source.name, samples)
    stats = compute_stats(source, samples)
    if write:
        save_stats(stats, cache, min(samples, len(source)))
    return stats


def build_sources(cfg: Config) -> list[Source]:
    """The configured sources, listed and checked (unique names, files present)."""
    if not cfg.data.sources:
        raise ConfigError("config key 'data.sources': no data source given")
    channels = {"opt": cfg.model.opt_channels, "sar": cfg.model.sar_channels}
    sources = [build_source(s, channels) for s in cfg.data.sources]
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
        norms = source_stats(source, source_cfg.stats, run_dir / "stats" / f"{source.name}.json",
                             cfg.data.stats_samples, write_stats)
        transforms.append(PairedCrop(cfg.model.img_size, cfg.data.crop_scale, cfg.data.crop_ratio,
                                     cfg.data.hflip, norms))
    caches = None
    if cfg.method.okd and cfg.method.teacher.cache:
        caches = [TeacherFeatureCache(cfg.method.teacher.cache, s) if "opt" in s.modalities else None for s in sources]
    return PretrainDataset(sources, transforms, caches, cfg.model.img_size // cfg.model.patch_size)


def build_loader(cfg: Config, dataset: PretrainDataset, world_size: int, rank: int) -> DataLoader:
    sampler = HomogeneousBatchSampler(dataset.pools(), cfg.data.batch_size, world_size, rank, cfg.seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
