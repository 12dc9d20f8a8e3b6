"""CCL contrastive spaces (Table IIc): how a pair's token sets become two embeddings to contrast.

Each head maps (optical tokens (B, L, D), SAR tokens (B, L, D)) to pooled embeddings
(a, b), each (B, D'). Per-modality parameters live under ``opt`` and ``sar``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from codemae.models.attention import CrossAttentionResidual, Mlp


class CrossAttentionSpace(nn.Module):
    """CoDe-MAE's conditioned space: each modality attends to the other (residual cross-attention), then
    mean-pools. Its LayerNorms keep eps 1e-5, as published (the block does not pass its norm layer on)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.opt = CrossAttentionResidual(dim, num_heads, eps=1e-5)
        self.sar = CrossAttentionResidual(dim, num_heads, eps=1e-5)

    def forward(self, opt: Tensor, sar: Tensor) -> tuple[Tensor, Tensor]:
        return self.opt(opt, sar).mean(1), self.sar(sar, opt).mean(1)


class VanillaSpace(nn.Module):
    """Mean-pooled tokens, contrasted as they are."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()

    def forward(self, opt: Tensor, sar: Tensor) -> tuple[Tensor, Tensor]:
        return opt.mean(1), sar.mean(1)


class ProjectedSpace(nn.Module):
    """Mean-pooled tokens through one projection per modality (made by ``make``)."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.opt = make()
        self.sar = make()

    def forward(self, opt: Tensor, sar: Tensor) -> tuple[Tensor, Tensor]:
        return self.opt(opt.mean(1)), self.sar(sar.mean(1))


CCL_HEADS: dict[str, Callable[[int, int], nn.Module]] = {
    "cross_attention": CrossAttentionSpace,
    "vanilla": VanillaSpace,
    "linear": lambda dim, heads: ProjectedSpace(lambda: nn.Linear(dim, dim)),
    "mlp": lambda dim, heads: ProjectedSpace(lambda: Mlp(dim, 4 * dim)),
}
