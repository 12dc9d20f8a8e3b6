"""The measures behind the analysis report, as plain functions of tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure

from codemae.losses import patchify


def singular_spectrum(x: Tensor, centre: bool = True) -> Tensor:
    """Singular values of the embedding matrix (N, D), divided by the largest (log-plot ready)."""
    x = x.double()
    if centre:
        x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    return (s / s[0].clamp_min(1e-12)).float()


def effective_rank(x: Tensor, centre: bool = False) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli, 2007):
    ``n`` for an n x n identity, 1 for a rank-1 matrix."""
    x = x.double()
    if centre:
        x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def patch_ssim(a: Tensor, b: Tensor, patch: int) -> Tensor:
    """SSIM (torchmetrics, Gaussian window 11, data range 1) of each co-located ``patch x patch``
    patch of two single-channel image batches (B, 1, H, W) in [0, 1]: (B, H/p * W/p)."""
    def patches(x: Tensor) -> Tensor:
        b_, _, h, w = x.shape
        x = x.reshape(b_, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4)
        return x.reshape(-1, 1, patch, patch)

    values = structural_similarity_index_measure(patches(a.float()), patches(b.float()), data_range=1.0,
                                                 reduction="none", kernel_size=min(11, patch - (patch + 1) % 2))
    return values.reshape(a.shape[0], -1)


def reconstruction_errors(recon: Tensor, target: Tensor, mask: Tensor, patch: int) -> tuple[float, float]:
    """Squared error against ``target`` summed over the masked patches (``mask`` (B, N) 1) of the
    reconstruction and of the same reconstruction flattened to its own patch means (over each patch's
    pixels and channels). The first below the second: the structure the model predicts inside the
    masked patches is real, not noise around flat patches. Images (B, C, H, W)."""
    r, t = patchify(recon.float(), patch), patchify(target.float(), patch)
    m = mask.float()[..., None]
    model = ((r - t) ** 2 * m).sum()
    flat = ((r.mean(-1, keepdim=True) - t) ** 2 * m).sum()
    return float(model), float(flat)


def smooth_field_errors(target: Tensor, patch: int) -> tuple[float, float]:
    """A yardstick for :func:`reconstruction_errors`' ratio: the squared error over all patches of a
    smooth field through the target's own patch means (bilinear between the patch centres, each patch
    shifted back to its exact mean) and of the flat patch means themselves, means over each patch's
    pixels and channels. Their ratio is the within-patch error an oracle that knew every patch's mean
    and nothing else would remove by interpolating; images (B, C, H, W)."""
    level = target.float().mean(1, keepdim=True)
    means = F.avg_pool2d(level, patch)
    flat = F.interpolate(means, scale_factor=patch, mode="nearest")
    field = F.interpolate(means, scale_factor=patch, mode="bilinear", align_corners=False)
    smooth = field - F.interpolate(F.avg_pool2d(field, patch), scale_factor=patch, mode="nearest") + flat
    t = target.float()
    return float(((smooth - t) ** 2).sum()), float(((flat - t) ** 2).sum())


def patch_alignment(opt_tokens: Tensor, sar_tokens: Tensor) -> Tensor:
    """Cosine similarity of the optical and SAR patch embeddings at each location: (B, N)."""
    return F.cosine_similarity(opt_tokens, sar_tokens, dim=-1)


@dataclass
class Binned:
    """Mean (and std, count) of ``y`` within equal-count bins of ``x``; ``slope`` of the least-squares line."""

    centres: list[float]
    means: list[float]
    stds: list[float]
    counts: list[int]
    slope: float
    intercept: float


def bin_by(x: Tensor, y: Tensor, bins: int = 10) -> Binned:
    x, y = x.flatten().double().numpy(), y.flatten().double().numpy()
    order = np.argsort(x, kind="stable")
    groups = [g for g in np.array_split(order, bins) if len(g)]
    slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(y.mean()))
    return Binned([float(x[g].mean()) for g in groups], [float(y[g].mean()) for g in groups],
                  [float(y[g].std()) for g in groups], [len(g) for g in groups], float(slope), float(intercept))


def project_2d(points: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """UMAP to 2-D when umap-learn is installed (the ``analysis`` extra), otherwise PCA."""
    try:
        import umap
    except ImportError:
        centred = points - points.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T, "PCA (umap-learn not installed: pip install 'codemae[analysis]')"
    reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(points) - 1))
    return reducer.fit_transform(points), "UMAP"
