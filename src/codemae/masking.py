"""MAE random masking, consistent (one mask per pair) or independent (one per modality)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass
class Mask:
    """A random mask over ``N`` patches of ``B`` images.

    ``ids_keep`` (B, L): visible patch indices in ascending order of their noise;
    ``ids_restore`` (B, N): inverse permutation to put [visible, masked] back in place;
    ``mask`` (B, N): 1.0 where the patch is masked (hidden from the encoder), 0.0 where visible.
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor

    @property
    def ids_masked(self) -> Tensor:
        """(B, N - L): the masked patch indices (where ``mask`` is 1), in ascending order of their noise."""
        return self.ids_restore.argsort(dim=1)[:, self.ids_keep.shape[1]:]


def num_visible(num_patches: int, ratio: float) -> int:
    """Visible patches for a mask ratio (MAE rounds down the kept count): 196 at 0.75 -> 49."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return max(1, int(num_patches * (1.0 - ratio)))


def random_mask(batch: int, num_patches: int, ratio: float, device: torch.device | str = "cpu",
                generator: torch.Generator | None = None) -> Mask:
    """Per-sample uniform random masking keeping ``num_visible(num_patches, ratio)`` patches."""
    keep = num_visible(num_patches, ratio)
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0.0
    return Mask(ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore))


def modality_masks(modalities: list[str], batch: int, num_patches: int, ratios: float | dict[str, float],
                   mode: Literal["consistent", "independent"], device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> dict[str, Mask]:
    """One mask per modality: the same object for all (consistent) or drawn separately
    (independent, where each modality may have its own ratio and so its own visible count)."""
    ratio_of = ratios if isinstance(ratios, dict) else dict.fromkeys(modalities, ratios)
    if mode == "consistent":
        if len({ratio_of[m] for m in modalities}) > 1:
            raise ValueError("consistent masking needs one mask ratio for all modalities")
        shared = random_mask(batch, num_patches, ratio_of[modalities[0]], device, generator)
        return {m: shared for m in modalities}
    return {m: random_mask(batch, num_patches, ratio_of[m], device, generator) for m in modalities}
