"""Cross-modal retrieval between co-registered pairs: R@1, R@5 and median rank, both directions."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def ranks(queries: Tensor, gallery: Tensor) -> Tensor:
    """Rank (1 = best) of each query's own pair in the gallery by cosine similarity; a gallery
    item counts as ahead only if strictly more similar (ties favour the true pair)."""
    sims = F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).T
    own = sims.diagonal().unsqueeze(1)
    return (sims > own).sum(1) + 1


def retrieval_metrics(opt: Tensor, sar: Tensor) -> dict[str, float]:
    """Optical->SAR and SAR->optical recall at 1 and 5 (%) and median rank; row i of each is a pair."""
    out = {}
    for name, (q, g) in {"opt->sar": (opt, sar), "sar->opt": (sar, opt)}.items():
        r = ranks(q, g).float()
        out[f"{name} R@1"] = 100 * (r <= 1).float().mean().item()
        out[f"{name} R@5"] = 100 * (r <= 5).float().mean().item()
        out[f"{name} median rank"] = r.median().item()
    return out


def random_expectation(n: int) -> dict[str, float]:
    """What a random embedding scores on n pairs: R@k = k/n, median rank (n+1)/2."""
    return {"R@1": 100 / n, "R@5": 100 * min(5, n) / n, "median rank": (n + 1) / 2}


