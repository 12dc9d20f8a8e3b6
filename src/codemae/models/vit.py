"""Plain ViT trunk (MAE-style, no class token) with per-modality patch embeddings."""

from __future__ import annotations

from torch import Tensor, nn

from codemae.models.attention import Block, init_weights, layer_norm, stochastic_depth
from codemae.models.backbone import Backbone, EncoderOutput, gather_tokens

VIT_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


class ViT(Backbone):
    """ViT with a conv patch embedding (kernel = stride = patch size) per modality."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        channels: dict[str, int],
        embed_dim: int,
        depth: int,
        num_heads: int,
        drop_path: float = 0.0,
        pos_interp: str = "exact",
    ) -> None:
        super().__init__(img_size, patch_size, channels, embed_dim, pos_interp)
        self.embed_dim = embed_dim
        self.num_attention_blocks = depth
        self.num_heads = num_heads
        self.level_dims = [embed_dim]
        self.level_grids = [1]
        self.patch_embed = nn.ModuleDict({
            m: nn.Conv2d(c, embed_dim, kernel_size=patch_size, stride=patch_size) for m, c in channels.items()
        })
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, 4.0, p) for p in stochastic_depth(drop_path, depth))
        self.norm = layer_norm(embed_dim)
        self.apply(init_weights)
        for conv in self.patch_embed.values():  # xavier-uniform, viewed as a linear layer (as MAE does)
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))

    def embed(self, image: Tensor, modality: str) -> Tensor:
        return self.patch_embed[modality](image).flatten(2).transpose(1, 2)

    def prepare(self, tokens: Tensor, ids_keep: Tensor | None) -> Tensor:
        """Embedded tokens (B, N, D) -> kept tokens with their position embedding (B, L, D)."""
        return gather_tokens(tokens, ids_keep) + self.pos_for(tokens.shape[1], ids_keep, tokens.shape[0])

    def trunk(self, tokens: Tensor, ids_keep: Tensor | None, return_blocks: tuple[int, ...] = ()) -> EncoderOutput:
        x = self.prepare(tokens, ids_keep)
        x, hidden = self.run_blocks(x, return_blocks)
        x = self.norm(x)
        return EncoderOutput(x, [x], hidden)
