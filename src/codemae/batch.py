"""The batch contract: what the data pipeline yields and every method reads.

Ground floor: imported by Data, Models and Methods alike; imports nothing of codemae.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import torch
from torch import Tensor

MODALITIES = ("opt", "sar")


class Batch(TypedDict, total=False):
    """One batch of B samples. A paired batch holds B pairs (2B images); an unpaired one holds
    optical-only and SAR-only samples, each key stacking the samples that have it.

    - ``opt``: (B, C_opt, H, W) normalised optical images, or None.
    - ``sar``: (B, C_sar, H, W) normalised SAR images, or None.
    - ``paired``: whether ``opt[i]`` and ``sar[i]`` show the same place.
    - ``opt_mean``, ``opt_std``, ``sar_mean``, ``sar_std``: (B, C) the normalisation each
      sample went through, so [0, 1] values can be recovered (OKD's live teacher does).
    - ``teacher_opt``: (B, N, D) cached OKD teacher features on the student's patch grid.
    - ``skipped``: (k,) unreadable samples the loader passed over (``data.on_error=skip``);
      a side count, not model input.
    - ``id``: (B, 2) (source, sample index) per sample of a shard stream, for tracing.
    """

    opt: Tensor | None
    sar: Tensor | None
    paired: bool
    opt_mean: Tensor
    opt_std: Tensor
    sar_mean: Tensor
    sar_std: Tensor
    teacher_opt: Tensor
    skipped: Tensor
    id: Tensor


SIDE_KEYS = ("skipped", "id")  # carried along, never model input


def make_batch(opt: Tensor | None = None, sar: Tensor | None = None, paired: bool | None = None, **extra) -> Batch:
    """A batch from images (tests, benchmarks, callers outside the pipeline); ``paired``
    defaults to whether both modalities are given."""
    if opt is None and sar is None:
        raise ValueError("a batch needs at least one of opt and sar")
    both = opt is not None and sar is not None
    return Batch(opt=opt, sar=sar, paired=both if paired is None else paired, **extra)


def collate(items: list[dict[str, Tensor]]) -> Batch:
    """Stack samples into a :class:`Batch`; an absent modality is None."""
    batch: dict = {"paired": all("opt" in item and "sar" in item for item in items)}
    for key in dict.fromkeys(k for item in items for k in item):
        batch[key] = torch.stack([item[key] for item in items if key in item])
    for m in MODALITIES:
        batch.setdefault(m, None)
    return Batch(**batch)


def model_input(batch: Batch, device: torch.device) -> tuple[Batch, int]:
    """The batch on ``device`` without its side keys, and its count of skipped samples."""
    skipped = int(batch["skipped"].sum()) if "skipped" in batch else 0
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
             for k, v in batch.items() if k not in SIDE_KEYS}
    return Batch(**moved), skipped


def images_of(batch: Batch) -> dict[str, Tensor]:
    """The modalities present in a batch, optical first."""
    return {m: batch[m] for m in MODALITIES if batch.get(m) is not None}


@dataclass(frozen=True)
class Geometry:
    """What the data pipeline must know of the model: the square input size, the patch size
    (teacher features live on the patch grid) and the channels each modality's embedding takes."""

    img_size: int
    patch_size: int
    channels: dict[str, int]

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


def images_in(pairs: int) -> int:
    """Images in a batch of ``pairs`` samples (a pair is one image per modality; an unpaired batch
    takes ``pairs`` images of each modality)."""
    return pairs * len(MODALITIES)
