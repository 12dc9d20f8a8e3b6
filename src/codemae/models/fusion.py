"""Cross-attention fusion (Fus-MAE, SPEC section 2): the fusion block and the early-fusion encoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codemae.batch import MODALITIES
from codemae.models.attention import Block, CrossAttentionResidual, init_weights
from codemae.models.backbone import EncoderOutput
from codemae.models.vit import ViT


class CrossFusion(nn.Module):
    """``z' = z + CA(LN(z), LN(context))`` then ``z' + MLP(LN(z'))``; without context, the MLP step only."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.cross = CrossAttentionResidual(dim, num_heads)
        self.mlp = Block(dim, 0, 4.0)

    def forward(self, z: Tensor, context: Tensor | None) -> Tensor:
        return self.mlp(z if context is None else self.cross(z, context))


class FusionViT(ViT):
    """XAE&D's encoder: a ViT whose first block is a cross-attention fusion block.

    ``fus = concat(x + CA(x, y), y + CA(y, x))`` (one CA module serves both directions),
    ``fus + MLP(fus)``; a learned CLS token is prepended and the other ``depth - 1`` blocks
    attend over both modalities jointly; the final tokens are split back per modality
    (CLS dropped). With one modality the fusion block applies its residual MLP only.
    """

    def __init__(self, img_size: int, patch_size: int, channels: dict[str, int], embed_dim: int, depth: int,
                 num_heads: int, drop_path: float = 0.0, pos_interp: str = "exact") -> None:
        if depth < 2:
            raise ValueError(f"the fusion encoder needs depth >= 2 (a fusion block and attention), got {depth}")
        super().__init__(img_size, patch_size, channels, embed_dim, depth - 1, num_heads, drop_path, pos_interp)
        self.num_attention_blocks = depth
        self.fusion = CrossFusion(embed_dim, num_heads)
        self.fusion.apply(init_weights)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.normal_(self.cls_token, std=0.02)

    def layer_id(self, name: str) -> int:
        """0 for embeddings and the CLS token, 1 for the fusion block, i + 2 for block i, then the rest."""
        head, _, rest = name.partition(".")
        if head == "fusion":
            return 1
        if head == "blocks":
            return int(rest.partition(".")[0]) + 2
        return 0 if head in (*self.EMBEDDING_PARTS, "cls_token") else self.num_layers

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"cls_token"}

    def forward(self, images: dict[str, Tensor], ids_keep: dict[str, Tensor | None] | None = None,
                return_blocks: tuple[int, ...] = ()) -> dict[str, EncoderOutput]:
        if return_blocks:
            raise ValueError("the fusion encoder returns no intermediate blocks")
        ids_keep = ids_keep or {}
        names = [m for m in MODALITIES if images.get(m) is not None]
        if not names:
            raise ValueError("no modality to encode: images holds neither 'opt' nor 'sar'")
        tokens = {m: self.prepare(self.embed(images[m], m), ids_keep.get(m)) for m in names}
        fused = [self.fusion(tokens[m], next((tokens[o] for o in names if o != m), None)) for m in names]
        x = torch.cat([self.cls_token.expand(fused[0].shape[0], -1, -1), *fused], dim=1)
        for block in self.blocks:
            x = block(x)
        parts = self.norm(x)[:, 1:].split([t.shape[1] for t in fused], dim=1)
        return {m: EncoderOutput(part, [part]) for m, part in zip(names, parts)}
