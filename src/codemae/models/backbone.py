"""The encoder contract shared by every backbone and every method.

A backbone owns one patch embedding per modality and a trunk shared by all of
them. Images of several modalities are embedded separately, masked (each with
its own kept-token indices), concatenated on the batch axis and run through the
trunk together, then split back per modality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from codemae.batch import MODALITIES
from codemae.models.pos_embed import published_resize, resize_pos_embed, sincos_2d


@dataclass
class EncoderOutput:
    """What the trunk returns for one modality, at the kept token positions.

    ``tokens``: (B, L, D) final normalised tokens.
    ``levels``: pyramid features, coarsest first, each (B, L, s*s*C) where ``s`` is
    the level's sub-patch grid (1, 2, 4); a plain ViT has one level.
    ``hidden``: outputs of the requested attention blocks, by block index.
    """

    tokens: Tensor
    levels: list[Tensor]
    hidden: dict[int, Tensor] = field(default_factory=dict)


def gather_tokens(x: Tensor, ids_keep: Tensor | None) -> Tensor:
    """Select tokens ``ids_keep`` (B, L) along dim 1 of ``x`` (B, N, ...)."""
    if ids_keep is None:
        return x
    index = ids_keep.reshape(ids_keep.shape + (1,) * (x.ndim - 2)).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


class Encoder(Protocol):
    """What every encoder offers its methods and evaluations: geometry, the per-modality call, and
    its parameter-group knowledge (no-weight-decay names, layer ids for layer-wise lr decay)."""

    img_size: int
    patch_size: int
    grid: int
    embed_dim: int
    num_heads: int
    num_attention_blocks: int
    level_dims: list[int]
    level_grids: list[int]
    channels: dict[str, int]
    layout: str  # "mae" (ViT) or "itpn" (HiViT + iTPN): initialisation and decoder embedding of its methods

    def __call__(self, images: dict[str, Tensor], ids_keep: dict[str, Tensor | None] | None = None,
                 return_blocks: tuple[int, ...] = ()) -> dict[str, EncoderOutput]: ...

    @property
    def num_layers(self) -> int:
        """Layer ids run 0 (embeddings) .. ``num_layers`` (everything after the last block)."""

    def layer_id(self, name: str) -> int:
        """The layer id of parameter ``name`` (relative to the encoder)."""

    def no_weight_decay(self) -> set[str]:
        """Names (relative to the encoder) of parameters never weight-decayed beyond biases and norms."""


class Backbone(nn.Module):
    """Per-modality patch embeddings + a shared trunk. Subclasses define the trunk and
    ``EMBEDDING_PARTS``, the top-level children that sit before the first attention block."""

    EMBEDDING_PARTS: tuple[str, ...] = ("patch_embed", "pos_embed")
    layout = "mae"  # the published family it follows: how methods initialise their layers and embed its levels

    embed_dim: int
    level_dims: list[int]
    level_grids: list[int]
    num_attention_blocks: int
    num_heads: int

    def __init__(self, img_size: int, patch_size: int, channels: dict[str, int], pos_dim: int,
                 pos_interp: str = "exact") -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.channels = dict(channels)
        self.grid = img_size // patch_size
        self.pos_embed = nn.Parameter(sincos_2d(pos_dim, self.grid).unsqueeze(0))
        self.pos_interp = pos_interp

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_layers(self) -> int:
        return self.num_attention_blocks + 1

    def layer_id(self, name: str) -> int:
        """0 for the embedding parts, i + 1 for attention block i, ``num_layers`` for the rest
        (final norm, pyramid)."""
        head, _, rest = name.partition(".")
        if head == "blocks":
            return int(rest.partition(".")[0]) + 1
        return 0 if head in self.EMBEDDING_PARTS else self.num_layers

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def embed(self, image: Tensor, modality: str) -> Tensor:
        """Patch-embed one modality: (B, C, H, W) -> (B, N, ...) tokens in row-major patch order."""
        raise NotImplementedError

    def trunk(self, tokens: Tensor, ids_keep: Tensor | None, return_blocks: tuple[int, ...] = ()) -> EncoderOutput:
        """Run the shared layers on embedded tokens, keeping only ``ids_keep``."""
        raise NotImplementedError

    def run_blocks(self, x: Tensor, return_blocks: tuple[int, ...]) -> tuple[Tensor, dict[int, Tensor]]:
        """Apply ``self.blocks``, keeping the outputs of the blocks listed in ``return_blocks``."""
        hidden = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in return_blocks:
                hidden[i] = x
        return x, hidden

    def pos_for(self, num_tokens: int, ids_keep: Tensor | None, batch: int) -> Tensor:
        """Position embedding resized to ``num_tokens`` patches and gathered at ``ids_keep``.

        ``pos_interp: published`` reproduces the published models: whenever the kept tokens are not
        the stored grid (every masked forward, other sizes), the table goes through a bicubic
        resampling at scale (grid + 0.1) / stored grid, which changes it slightly even at equal size.
        """
        if self.pos_interp == "published" and (ids_keep is not None or num_tokens != self.pos_embed.shape[1]):
            pos = published_resize(self.pos_embed, math.isqrt(num_tokens))
        else:
            pos = resize_pos_embed(self.pos_embed, num_tokens)
        return gather_tokens(pos.expand(batch, -1, -1), ids_keep)

    def forward(
        self,
        images: dict[str, Tensor],
        ids_keep: dict[str, Tensor | None] | None = None,
        return_blocks: tuple[int, ...] = (),
    ) -> dict[str, EncoderOutput]:
        """Encode each modality present in ``images`` with the shared trunk.

        Modalities whose kept-token counts agree run through the trunk as one batch
        (optical first), as in the paper; otherwise each runs on its own.
        """
        names = [m for m in MODALITIES if images.get(m) is not None]
        if not names:
            raise ValueError("no modality to encode: images holds neither 'opt' nor 'sar'")
        ids_keep = ids_keep or {}
        embedded = {m: self.embed(images[m], m) for m in names}
        keeps = {m: ids_keep.get(m) for m in names}
        kept = {m: embedded[m].shape[1] if keeps[m] is None else keeps[m].shape[1] for m in names}
        joinable = len({embedded[m].shape[1:] for m in names}) == 1 and len(set(kept.values())) == 1
        if len(names) == 1 or not joinable:
            return {m: self.trunk(embedded[m], keeps[m], return_blocks) for m in names}
        sizes = [embedded[m].shape[0] for m in names]
        num_tokens = embedded[names[0]].shape[1]
        keep = None
        if any(keeps[m] is not None for m in names):
            keep = torch.cat([
                keeps[m] if keeps[m] is not None
                else torch.arange(num_tokens, device=embedded[m].device).expand(embedded[m].shape[0], -1)
                for m in names
            ])
        out = self.trunk(torch.cat([embedded[m] for m in names]), keep, return_blocks)
        return dict(zip(names, _split_output(out, sizes)))


def _split_output(out: EncoderOutput, sizes: list[int]) -> list[EncoderOutput]:
    tokens = out.tokens.split(sizes)
    levels = list(zip(*(level.split(sizes) for level in out.levels)))
    hidden = {i: h.split(sizes) for i, h in out.hidden.items()}
    return [
        EncoderOutput(tokens[j], list(levels[j]), {i: h[j] for i, h in hidden.items()})
        for j in range(len(sizes))
    ]


class PerModalityBackbones(nn.Module):
    """One backbone per modality: the "independent encoders" ablation, called like a :class:`Backbone`."""

    def __init__(self, backbones: dict[str, Backbone]) -> None:
        super().__init__()
        self.backbones = nn.ModuleDict(backbones)
        ref = next(iter(backbones.values()))
        self.img_size, self.patch_size, self.grid = ref.img_size, ref.patch_size, ref.grid
        self.embed_dim, self.num_heads, self.num_attention_blocks = ref.embed_dim, ref.num_heads, ref.num_attention_blocks
        self.level_dims, self.level_grids, self.layout = ref.level_dims, ref.level_grids, ref.layout
        self.channels = {m: c for b in backbones.values() for m, c in b.channels.items()}

    @property
    def num_layers(self) -> int:
        return next(iter(self.backbones.values())).num_layers

    def layer_id(self, name: str) -> int:
        _, modality, rest = name.split(".", 2)  # backbones.<modality>.<name>
        return self.backbones[modality].layer_id(rest)

    def no_weight_decay(self) -> set[str]:
        return {f"backbones.{m}.{n}" for m, b in self.backbones.items() for n in b.no_weight_decay()}

    def forward(
        self,
        images: dict[str, Tensor],
        ids_keep: dict[str, Tensor | None] | None = None,
        return_blocks: tuple[int, ...] = (),
    ) -> dict[str, EncoderOutput]:
        ids_keep = ids_keep or {}
        return {
            m: self.backbones[m]({m: images[m]}, {m: ids_keep.get(m)}, return_blocks)[m]
            for m in MODALITIES if images.get(m) is not None
        }
