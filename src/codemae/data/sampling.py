"""Per-process batches that are entirely paired or entirely unpaired, split across ranks.

Each epoch is a shuffled list of step groups. A group holds one batch per rank, all
of the same kind, so every rank runs the same kind of batch at the same step (the
cross-process contrastive negatives never mix kinds). Each source contributes
``weight x size`` draws per epoch (the mixture weights). A paired batch is B pairs; an
unpaired batch is B optical + B SAR images (optical:SAR 1:1), the smaller unpaired
pool cycling to match the larger. Every index carries its own augmentation seed,
so the whole epoch, augmentations included, is a pure function of (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from codemae.errors import DataError


@dataclass(frozen=True)
class Part:
    """The dataset indices of one source and its sampling weight."""

    indices: np.ndarray
    weight: float = 1.0

    @property
    def size(self) -> int:
        """Samples drawn from this source per epoch."""
        return int(round(self.weight * len(self.indices)))

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One epoch's draws: every index ``floor(weight)`` times, the fractional rest at random."""
        copies, rest = divmod(self.size, len(self.indices)) if len(self.indices) else (0, 0)
        whole = np.tile(self.indices, copies)
        return np.concatenate([whole, rng.permutation(self.indices)[:rest]]) if rest else whole


@dataclass(frozen=True)
class Pools:
    """Dataset indices by kind (paired samples, unpaired optical, unpaired SAR), one part per source."""

    paired: tuple[Part, ...]
    opt: tuple[Part, ...]
    sar: tuple[Part, ...]

    @classmethod
    def of(cls, paired: np.ndarray, opt: np.ndarray, sar: np.ndarray) -> Pools:
        """Pools of one unweighted part per kind."""
        return cls(*(((Part(np.asarray(i)),) if len(i) else ()) for i in (paired, opt, sar)))

    def size(self, kind: str) -> int:
        return sum(part.size for part in getattr(self, kind))

    def draw(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        """One epoch's shuffled draws of ``kind``, each source contributing its weighted share."""
        parts = [part.draw(rng) for part in getattr(self, kind)]
        return rng.permutation(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Group:
    """One step: ``indices[r]`` and ``seeds[r]`` are rank r's batch."""

    paired: bool
    indices: np.ndarray
    seeds: np.ndarray


class HomogeneousBatchSampler:
    """Batch sampler for ``DataLoader(batch_sampler=...)``; yields lists of (index, seed)."""

    def __init__(self, pools: Pools, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0) -> None:
        self.pools = pools
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start = 0
        step = batch_size * world_size
        self.num_paired = pools.size("paired") // step
        self.num_unpaired = max(pools.size("opt"), pools.size("sar")) // step
        if self.num_paired + self.num_unpaired == 0:
            raise DataError(
                f"not enough data for one step: {pools.size('paired')} pairs, {pools.size('opt')} optical and "
                f"{pools.size('sar')} SAR unpaired images, but a step needs {batch_size} x {world_size} processes"
            )

    def __len__(self) -> int:
        return self.num_paired + self.num_unpaired

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's plan and skip its first ``start`` steps (resuming mid-epoch)."""
        self.epoch = epoch
        self.start = start

    def plan(self, epoch: int) -> list[Group]:
        """All step groups of an epoch, in order; identical on every rank."""
        rng = np.random.default_rng([self.seed, epoch])
        b, w = self.batch_size, self.world_size
        groups = []
        if self.num_paired:
            paired = self.pools.draw("paired", rng)[: self.num_paired * b * w]
            groups += [(True, chunk.reshape(w, b)) for chunk in paired.reshape(self.num_paired, b * w)]
        if self.num_unpaired:
            n = self.num_unpaired * b * w
            draws = [self.pools.draw(kind, rng) for kind in ("opt", "sar")]
            parts = [np.resize(d, n).reshape(self.num_unpaired, w, b) for d in draws if len(d)]
            unpaired = np.concatenate(parts, axis=2)
            groups += [(False, chunk) for chunk in unpaired]
        order = rng.permutation(len(groups))
        seeds = rng.integers(0, 2**62, size=(len(groups), w, max(g[1].shape[1] for g in groups)))
        return [Group(groups[i][0], groups[i][1], seeds[k, :, : groups[i][1].shape[1]]) for k, i in enumerate(order)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for group in self.plan(self.epoch)[self.start :]:
            yield list(zip(group.indices[self.rank].tolist(), group.seeds[self.rank].tolist()))
