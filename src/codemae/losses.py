"""Losses shared by the pretraining methods."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, P*P*C), patches in row-major order, pixels as (p, q, c)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, channels: int) -> Tensor:
    """Inverse of :func:`patchify` for a square grid."""
    b, n, _ = patches.shape
    g = int(round(n ** 0.5))
    p = patch_size
    x = patches.reshape(b, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * p, g * p)


def patch_errors(pred: Tensor, target: Tensor, norm_pix: bool = True, eps: float = 1e-6) -> Tensor:
    """Per-patch MSE (B, N) between predicted and target patch vectors (B, N, K).

    With ``norm_pix`` each target patch is first normalised by its own mean and
    variance (MAE's norm_pix_loss).
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    return (pred - target).pow(2).mean(dim=-1)


def masked_mean(values: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
    """Mean of ``values`` over the positions where ``masks`` is 1, pooled over all pairs given."""
    return sum((v * m).sum() for v, m in zip(values, masks)) / sum(m.sum() for m in masks)


def masked_patch_mse(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """MAE reconstruction loss: per-patch MSE averaged over masked patches only (``mask`` 1)."""
    return masked_mean([patch_errors(pred, target, norm_pix)], [mask])
