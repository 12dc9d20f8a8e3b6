"""HiViT trunk with the iTPN feature pyramid, in the published CoDe-MAE layout.

Each 16x16 patch is embedded as a 4x4 grid of sub-tokens; MLP-only stages and
patch merging work inside each patch, so masking can drop whole patches before
any layer runs. Attention blocks then run on one token per patch. The iTPN
pyramid rebuilds stride-8 and stride-4 features top-down from the final tokens.
"""

from __future__ import annotations

from torch import Tensor, nn

from codemae.models.attention import Block, init_trunc_normal, layer_norm, stochastic_depth
from codemae.models.backbone import Backbone, EncoderOutput, gather_tokens

HIVIT_SIZES = {
    "tiny": dict(embed_dim=384, depth=10, num_heads=6, mlp_depths=(1, 1)),
    "small": dict(embed_dim=384, depth=20, num_heads=6, mlp_depths=(2, 2)),
    "base": dict(embed_dim=512, depth=24, num_heads=8, mlp_depths=(3, 3)),
    "large": dict(embed_dim=768, depth=40, num_heads=12, mlp_depths=(2, 2)),
}
INNER = 4  # sub-tokens per patch side


class PatchEmbed(nn.Module):
    """One modality's sub-patch embedding: conv (kernel = stride = patch/4), then LayerNorm per sub-token."""

    def __init__(self, channels: int, dim: int, sub: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=sub, stride=sub)
        self.norm = layer_norm(dim)

    def forward(self, image: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, 4, 4, D): each patch's 4 x 4 sub-tokens (row, column), patches row-major."""
        x = self.proj(image)
        b, c, h, w = x.shape
        x = x.view(b, c, h // INNER, INNER, w // INNER, INNER).permute(0, 2, 4, 3, 5, 1)
        return self.norm(x.reshape(b, -1, INNER, INNER, c))


class PatchMerge(nn.Module):
    """(B, N, s, s, C) -> (B, N, s/2, s/2, 2C): concatenate 2x2 neighbours (Swin's order: (0,0), (1,0),
    (0,1), (1,1) as (row, column)), LN, bias-free Linear 4C -> 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = layer_norm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x.unflatten(2, (-1, 2)).unflatten(4, (-1, 2))  # B N s/2 2(row) s/2 2(col) C
        x = x.permute(0, 1, 2, 4, 5, 3, 6).flatten(-3)  # B N s/2 s/2 (col row C)
        return self.reduction(self.norm(x))


class PatchSplit(nn.Module):
    """(B, N, s, s, Cin) -> (B, N, 2s, 2s, Cout): LN, bias-free Linear to 4*Cout, sub-positions row-major."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = layer_norm(in_dim)
        self.reduction = nn.Linear(in_dim, 4 * out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, n, s, _, _ = x.shape
        x = self.reduction(self.norm(x)).unflatten(-1, (2, 2, -1))  # B N s s 2 2 C
        return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, n, 2 * s, 2 * s, -1)


class ITPNPyramid(nn.Module):
    """iTPN's top-down pyramid at width ``dim`` (fpn_depth 1, as CoDe-MAE publishes it).

    The final tokens (stride 16) split to stride 8 and add the aligned stage-2 features, an MLP
    block merges them; the same again to stride 4. Each output level (16, 8, 4) then passes its
    own MLP block. Only the stride-16 alignment has a bias.
    """

    def __init__(self, embed_dim: int, stage_dims: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.align16 = nn.Linear(embed_dim, dim)
        self.split16to8 = PatchSplit(embed_dim, dim)
        self.align8 = nn.Linear(stage_dims[1], dim, bias=False)
        self.block8 = Block(dim, 0, 4.0)
        self.split8to4 = PatchSplit(dim, dim)
        self.align4 = nn.Linear(stage_dims[0], dim, bias=False)
        self.block4 = Block(dim, 0, 4.0)
        self.outputs = nn.ModuleList(Block(dim, 0, 4.0) for _ in range(3))  # strides 16, 8, 4

    def forward(self, s4: Tensor, s8: Tensor, s16: Tensor) -> list[Tensor]:
        top = s16[:, :, None, None, :]
        p8 = self.block8(self.split16to8(top) + self.align8(s8))
        p4 = self.block4(self.split8to4(p8) + self.align4(s4))
        return [out(level).flatten(2) for out, level in zip(self.outputs, (self.align16(top), p8, p4))]


class HiViT(Backbone):
    """HiViT + iTPN, laid out as the published CoDe-MAE / iTPN models: per-modality conv sub-patch
    embedding with its own LayerNorm, two MLP-only stages with merging, attention blocks (no final
    norm: the pyramid reads the last block), the iTPN pyramid."""

    layout = "itpn"

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        channels: dict[str, int],
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_depths: tuple[int, int] = (3, 3),
        pyramid_dim: int | None = None,
        drop_path: float = 0.0,
        pos_interp: str = "exact",
        pyramid: bool = True,
    ) -> None:
        super().__init__(img_size, patch_size, channels, embed_dim, pos_interp)
        if patch_size % INNER:
            raise ValueError(f"HiViT needs a patch size divisible by {INNER}, got {patch_size}")
        if embed_dim % 4:
            raise ValueError(f"HiViT needs embed_dim divisible by 4, got {embed_dim}")
        c0 = embed_dim // 4
        self.embed_dim = embed_dim
        self.num_attention_blocks = depth
        self.num_heads = num_heads
        self.mlp_depths = tuple(mlp_depths)
        pyramid_dim = pyramid_dim or embed_dim // 2
        self.level_dims = [pyramid_dim, 4 * pyramid_dim, 16 * pyramid_dim] if pyramid else [embed_dim]
        self.level_grids = [1, 2, 4] if pyramid else [1]
        sub = patch_size // INNER
        self.patch_embed = nn.ModuleDict({m: PatchEmbed(c, c0, sub) for m, c in channels.items()})
        rates = stochastic_depth(drop_path, sum(mlp_depths) + depth)
        d1, d2 = mlp_depths
        self.stage1 = nn.ModuleList(Block(c0, 0, 3.0, p) for p in rates[:d1])
        self.merge1 = PatchMerge(c0)
        self.stage2 = nn.ModuleList(Block(2 * c0, 0, 3.0, p) for p in rates[d1 : d1 + d2])
        self.merge2 = PatchMerge(2 * c0)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, 4.0, p) for p in rates[d1 + d2 :])
        # without the pyramid (the published classifiers) the one level is the final tokens
        self.pyramid = ITPNPyramid(embed_dim, (c0, 2 * c0), pyramid_dim) if pyramid else None
        self.apply(init_trunc_normal)

    @property
    def num_layers(self) -> int:
        """The published numbering (the authors' ``get_layer_id`` over iTPN's one block list): one id per
        MLP-only block, merge and attention block from 1, so 32 for HiViT-B; the last attention block
        shares the top id with everything after it (pyramid, head)."""
        return sum(self.mlp_depths) + 2 + self.num_attention_blocks

    def layer_id(self, name: str) -> int:
        """0 for the patch and position embeddings, then stage1 blocks, merge1, stage2 blocks, merge2
        and the attention blocks in order from 1; ``num_layers`` for the rest."""
        head, _, rest = name.partition(".")
        d1, d2 = self.mlp_depths
        first = {"stage1": 1, "merge1": d1 + 1, "stage2": d1 + 2, "merge2": d1 + d2 + 2, "blocks": d1 + d2 + 3}
        if head in ("stage1", "stage2", "blocks"):
            return first[head] + int(rest.partition(".")[0])
        if head in first:
            return first[head]
        return 0 if head in self.EMBEDDING_PARTS else self.num_layers

    def embed(self, image: Tensor, modality: str) -> Tensor:
        return self.patch_embed[modality](image)

    def trunk(self, tokens: Tensor, ids_keep: Tensor | None, return_blocks: tuple[int, ...] = ()) -> EncoderOutput:
        x = gather_tokens(tokens, ids_keep)
        for block in self.stage1:
            x = block(x)
        s4 = x
        x = self.merge1(x)
        for block in self.stage2:
            x = block(x)
        s8 = x
        x = self.merge2(x)[:, :, 0, 0, :] + self.pos_for(tokens.shape[1], ids_keep, tokens.shape[0])
        x, hidden = self.run_blocks(x, return_blocks)
        return EncoderOutput(x, self.pyramid(s4, s8, x) if self.pyramid else [x], hidden)
