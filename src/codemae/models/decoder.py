"""MAE decoders: pyramid-to-decoder embedding and the masked-token decoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codemae.models.attention import Block, layer_norm
from codemae.models.backbone import gather_tokens
from codemae.models.pos_embed import resize_pos_embed, sincos_2d


class DecoderEmbed(nn.Module):
    """Embed each pyramid level at the decoder width and sum the levels ("decoder-embedded" tokens).

    A level (B, L, s*s*C) holds s x s sub-tokens of C channels per patch. With ``norm`` (the iTPN
    layout) each sub-token passes LayerNorm(C) and Linear(C -> dim / s^2), and a patch's sub-tokens
    are concatenated in (row, column) order; without it (a ViT's single level) one Linear(C -> dim).
    """

    def __init__(self, level_dims: list[int], level_grids: list[int], dim: int, norm: bool) -> None:
        super().__init__()
        self.grids = list(level_grids)
        for s in self.grids:
            if dim % (s * s):
                raise ValueError(f"decoder width {dim} is not divisible by the {s}x{s} sub-tokens of a level")
        self.proj = nn.ModuleList(
            nn.Sequential(layer_norm(d // (s * s)), nn.Linear(d // (s * s), dim // (s * s))) if norm
            else nn.Linear(d, dim)
            for d, s in zip(level_dims, self.grids)
        )

    def forward(self, levels: list[Tensor]) -> Tensor:
        out = None
        for proj, level, s in zip(self.proj, levels, self.grids):
            b, n, _ = level.shape
            embedded = proj(level.view(b, n, s * s, -1)).reshape(b, n, -1)
            out = embedded if out is None else out + embedded
        return out


class MaskedDecoder(nn.Module):
    """Fills masked positions with a learned mask token, adds fixed sin-cos positions,
    runs transformer blocks and predicts a vector per patch. ``mask_copies``: masked positions hold
    that many mask tokens, summed (the published iTPN decoders fill each pyramid level with the
    token before summing the levels, so a masked position carries one per level). The method that
    builds a decoder initialises its layers (:data:`~codemae.models.attention.INITS`).

    ``outputs`` maps each input modality to the length of its per-patch prediction
    (P*P*C pixels for reconstruction). There is one output head per distinct length,
    so a 3-channel SAR input shares the optical head (as in the reference code)
    while 1- or 2-channel SAR gets its own.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, grid: int, outputs: dict[str, int],
                 mask_copies: int = 1) -> None:
        super().__init__()
        self.outputs = dict(outputs)
        self.mask_copies = mask_copies
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, 4.0) for _ in range(depth))
        self.norm = layer_norm(dim)
        self.heads = nn.ModuleDict({str(k): nn.Linear(dim, k) for k in sorted(set(outputs.values()))})
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, inputs: dict[str, tuple[Tensor, Tensor]],
                positions: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``inputs[m] = (visible tokens (B, L, D), ids_restore (B, N))`` -> predictions (B, N, outputs[m]).

        All modalities run through the blocks as one batch. ``positions[m]`` (B, M) patch indices:
        predict only there, (B, M, outputs[m]); the last block then computes its queries, MLP, norm
        and head at those positions only (its keys and values still come from all N).
        """
        names = list(inputs)
        full = [self._unshuffle(*inputs[m]) for m in names]
        sizes = [x.shape[0] for x in full]
        x = torch.cat(full)
        x = x + resize_pos_embed(self.pos_embed, x.shape[1])
        blocks = list(self.blocks)
        last = blocks.pop() if positions is not None and blocks else None
        for block in blocks:
            x = block(x)
        parts = x.split(sizes) if positions is None else at_positions(last, x, sizes, [positions[m] for m in names])
        return {m: self.heads[str(self.outputs[m])](self.norm(part)) for m, part in zip(names, parts)}

    def _unshuffle(self, visible: Tensor, ids_restore: Tensor) -> Tensor:
        b, n = ids_restore.shape
        mask = self.mask_token * self.mask_copies if self.mask_copies != 1 else self.mask_token
        tokens = torch.cat([visible, mask.expand(b, n - visible.shape[1], -1)], dim=1)
        return torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def at_positions(last: Block | None, x: Tensor, sizes: list[int], positions: list[Tensor]) -> list[Tensor]:
    """Each modality's tokens (its ``sizes`` rows of ``x``) at its ``positions`` (B, M) after the ``last``
    block, computed there only (taken as they are without a block); one call for all modalities when
    they have equally many positions."""
    step = last if last is not None else gather_tokens
    if len({ids.shape[1] for ids in positions}) == 1:
        return list(step(x, torch.cat(positions)).split(sizes))
    return [step(part, ids) for part, ids in zip(x.split(sizes), positions)]
