"""MAE decoders: pyramid-to-decoder embedding and the masked-token decoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codemae.models.attention import Block, init_weights, layer_norm
from codemae.models.pos_embed import resize_pos_embed, sincos_2d


class DecoderEmbed(nn.Module):
    """Project each pyramid level to the decoder width and sum them ("decoder-embedded" tokens)."""

    def __init__(self, level_dims: list[int], dim: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d, dim) for d in level_dims)
        self.apply(init_weights)

    def forward(self, levels: list[Tensor]) -> Tensor:
        return sum(proj(level) for proj, level in zip(self.proj, levels))


class MaskedDecoder(nn.Module):
    """Fills masked positions with a learned mask token, adds fixed sin-cos positions,
    runs transformer blocks and predicts a vector per patch.

    ``outputs`` maps each input modality to the length of its per-patch prediction
    (P*P*C pixels for reconstruction). There is one output head per distinct length,
    so a 3-channel SAR input shares the optical head (as in the reference code)
    while 1- or 2-channel SAR gets its own.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, grid: int, outputs: dict[str, int]) -> None:
        super().__init__()
        self.outputs = dict(outputs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, 4.0) for _ in range(depth))
        self.norm = layer_norm(dim)
        self.heads = nn.ModuleDict({str(k): nn.Linear(dim, k) for k in sorted(set(outputs.values()))})
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, inputs: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
        """``inputs[m] = (visible tokens (B, L, D), ids_restore (B, N))`` -> predictions (B, N, outputs[m]).

        All modalities run through the blocks as one batch.
        """
        names = list(inputs)
        full = [self._unshuffle(*inputs[m]) for m in names]
        sizes = [x.shape[0] for x in full]
        x = torch.cat(full)
        x = x + resize_pos_embed(self.pos_embed, x.shape[1])
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return {m: self.heads[str(self.outputs[m])](part) for m, part in zip(names, x.split(sizes))}

    def _unshuffle(self, visible: Tensor, ids_restore: Tensor) -> Tensor:
        b, n = ids_restore.shape
        tokens = torch.cat([visible, self.mask_token.expand(b, n - visible.shape[1], -1)], dim=1)
        return torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
