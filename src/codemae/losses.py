"""Losses shared by the pretraining methods."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
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


def denormalise(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """Map norm-pix predictions back to pixel values with each target patch's own mean and
    variance (how MAE visualises reconstructions)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + eps).sqrt() + mean


def masked_mean(values: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
    """Mean of ``values`` over the positions where ``masks`` is 1, pooled over all pairs given."""
    return sum((v * m).sum() for v, m in zip(values, masks)) / sum(m.sum() for m in masks)


def pooled_mean(values: Sequence[Tensor]) -> Tensor:
    """Mean over every element of all ``values``, pooled (the masked mean of values already taken at
    the masked positions)."""
    return sum(v.sum() for v in values) / sum(v.numel() for v in values)


def gather_rows(x: Tensor) -> tuple[Tensor, int]:
    """Every process's rows of ``x`` stacked in rank order, and the world size.

    The other processes' rows are detached copies; this process's own block is
    ``x`` itself, so gradient flows only into local embeddings.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 1
    world = dist.get_world_size()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts), world


def symmetric_info_nce(a: Tensor, b: Tensor, temperature: float, gradient: str = "exact") -> Tensor:
    """``(CE(a->b) + CE(b->a)) / 2`` over the L2-normalised rows of ``a`` and ``b`` (B, D);
    row i of ``a`` and of ``b`` are a positive pair, every other row a negative.

    Negatives come from all processes. ``exact``: each process evaluates the whole
    cross-process loss (its own rows sit at labels offset by rank), so the value is the
    same for any number of processes; its gradient, which reaches only the local rows,
    is scaled by the world size so that DDP's gradient averaging yields exactly the
    single-process gradient. ``local`` (the published code): each process scores only its
    own rows as queries against every process's rows gathered without any gradient, the
    local ones included, so the gradient flows through the query side only (identical
    to ``exact`` on one process).
    """
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    if gradient == "local":
        a_all, world = gather_rows(a.detach())
        if world == 1:
            return symmetric_info_nce(a, b, temperature)
        b_all, _ = gather_rows(b.detach())
        labels = torch.arange(a.shape[0], device=a.device) + dist.get_rank() * a.shape[0]
        return (F.cross_entropy(a @ b_all.T / temperature, labels)
                + F.cross_entropy(b @ a_all.T / temperature, labels)) / 2
    a_all, world = gather_rows(a)
    b_all, _ = gather_rows(b)
    logits = a_all @ b_all.T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss + (world - 1) * (loss - loss.detach())
