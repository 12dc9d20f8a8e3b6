"""Attention and MLP blocks shared by every backbone, decoder and method."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from codemae.models.backbone import gather_tokens

LN_EPS = 1e-6


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class Mlp(nn.Module):
    """Two linear layers with GELU."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``, one fused qkv projection
    (output channels [q | k | v], heads-major within each, as timm and the published models lay it out)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, queries: Tensor | None = None) -> Tensor:
        """(B, N, D) -> (B, N, D); with ``queries`` (B, M) token indices, the output (B, M, D) at those
        tokens only (their queries attend to the keys and values of all N tokens)."""
        if queries is None:
            q, k, v = self._heads(x, slice(0, 3))
        else:
            (q,) = self._heads(gather_tokens(x, queries), slice(0, 1))
            k, v = self._heads(x, slice(1, 3))
        out = F.scaled_dot_product_attention(q, k, v)
        b, m, d = q.shape[0], q.shape[2], x.shape[-1]
        return self.proj(out.transpose(1, 2).reshape(b, m, d))

    def _heads(self, x: Tensor, parts: slice) -> Tensor:
        """The ``parts`` of [q | k | v] projected from ``x`` (B, L, D), as (parts, B, heads, L, D / heads)."""
        b, n, d = x.shape
        weight = self.qkv.weight.view(3, d, d)[parts].flatten(0, 1)
        bias = None if self.qkv.bias is None else self.qkv.bias.view(3, d)[parts].flatten()
        out = F.linear(x, weight, bias)  # explicit part count: L may be 0 (a modality masked at ratio 0)
        return out.view(b, n, weight.shape[0] // d, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from ``x``, keys and values (output channels [k | v])
    from ``context``, which may have another length."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: attention then MLP, each residual with drop path.

    ``num_heads == 0`` gives HiViT's MLP-only block.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads) if num_heads > 0 else None
        self.norm1 = layer_norm(dim) if num_heads > 0 else None
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, queries: Tensor | None = None) -> Tensor:
        """(B, N, D) -> (B, N, D); with ``queries`` (B, M) token indices, the output (B, M, D) at those
        tokens only (keys and values still come from all N tokens)."""
        y = x if queries is None else gather_tokens(x, queries)
        if self.attn is not None:
            y = y + self.drop_path(self.attn(self.norm1(x), queries))
        return y + self.drop_path(self.mlp(self.norm2(y)))


class CrossAttentionResidual(nn.Module):
    """``x + CA(q=LN(x), kv=LN(y))``: residual cross-attention with no MLP and no output norm.
    ``eps``: of the two LayerNorms (the published CCL block keeps PyTorch's 1e-5)."""

    def __init__(self, dim: int, num_heads: int, eps: float = LN_EPS) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=eps)
        self.norm_kv = nn.LayerNorm(dim, eps=eps)
        self.attn = CrossAttention(dim, num_heads)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return x + self.attn(self.norm_q(x), self.norm_kv(y))


def init_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linear layers, zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_trunc_normal(module: nn.Module) -> None:
    """iTPN / published CoDe-MAE initialisation: linear weights N(0, 0.02) truncated at +-2 (absolute,
    so in effect untruncated), zero biases, unit norms; convolutions keep PyTorch's default."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


INITS = {"mae": init_weights, "itpn": init_trunc_normal}  # by an encoder's ``init_scheme``


def stochastic_depth(rate: float, n: int) -> list[float]:
    """Linearly increasing drop-path rates over ``n`` blocks."""
    return [rate * i / max(n - 1, 1) for i in range(n)]
