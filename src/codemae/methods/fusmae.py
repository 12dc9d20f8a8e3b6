"""Fus-MAE: cross-attention early (encoder) and feature-level (decoder) fusion (SPEC section 2).

- ``xaed`` (XAE&D): the first encoder block is replaced by a cross-attention fusion
  block, ``fus = concat(x + CA(x, y), y + CA(y, x))`` with one CA module serving both
  directions, ``fus + MLP(fus)``; a learned
  CLS token is prepended; the other N-1 blocks attend over both modalities
  jointly; the latents are split back per modality.
- ``xad`` (XAD): the encoder runs each modality on its own (no cross-modal path);
  fusion happens only in the decoders.
- Before each modality's lightweight decoder: ``z' = z + CA(z, z_other)``, ``z' + MLP(z')``.
- Loss: per-patch MSE on masked patches of each modality, pooled.

Missing modality (single-modality evaluation): a fusion block with nothing to
attend to skips its cross-attention term and applies only its residual MLP.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codemae.config import MethodConfig
from codemae.errors import ConfigError
from codemae.losses import masked_mean, patch_errors, patchify
from codemae.masking import modality_masks
from codemae.methods.base import PretrainMethod
from codemae.models.attention import Block, CrossAttentionResidual, init_weights
from codemae.models.backbone import MODALITIES
from codemae.models.decoder import DecoderEmbed, MaskedDecoder
from codemae.models.vit import ViT


class CrossFusion(nn.Module):
    """``z' = z + CA(LN(z), LN(context))`` then ``z' + MLP(LN(z'))``; without context, the MLP step only."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.cross = CrossAttentionResidual(dim, num_heads)
        self.mlp = Block(dim, 0, 4.0)

    def forward(self, z: Tensor, context: Tensor | None) -> Tensor:
        return self.mlp(z if context is None else self.cross(z, context))


class FusMAE(PretrainMethod):
    def __init__(self, encoder: ViT, cfg: MethodConfig) -> None:
        super().__init__()
        if not isinstance(encoder, ViT):
            raise ConfigError("config key 'model.backbone': Fus-MAE needs a ViT backbone (vit_tiny, vit_small, vit_base)")
        self.cfg = cfg
        self.encoder = encoder
        dim = encoder.embed_dim
        if cfg.fusion == "xaed":  # the fusion block replaces the first encoder block
            del encoder.blocks[0]
            self.encoder_fusion = CrossFusion(dim, encoder.num_heads)
            self.encoder_fusion.apply(init_weights)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.normal_(self.cls_token, std=0.02)
        self.decoder_embed = DecoderEmbed(encoder.level_dims, cfg.decoder_dim)
        self.decoder_fusion = nn.ModuleDict({m: CrossFusion(cfg.decoder_dim, cfg.decoder_heads) for m in MODALITIES})
        self.decoder_fusion.apply(init_weights)
        self.decoders = nn.ModuleDict({
            m: MaskedDecoder(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, encoder.grid,
                             {m: encoder.patch_size**2 * c})
            for m, c in encoder.channels.items()
        })

    def forward(self, batch: dict) -> dict[str, Tensor]:
        images = self.images(batch)
        first = next(iter(images.values()))
        masks = modality_masks(list(images), first.shape[0], self.encoder.num_patches, self.cfg.mask_ratios,
                               self.cfg.masking, first.device)
        latents = self.encode_kept(images, {m: masks[m].ids_keep for m in images})
        z = {m: self.decoder_embed([latents[m]]) for m in images}
        errors = []
        for m in images:
            other = next((z[o] for o in images if o != m), None)
            fused = self.decoder_fusion[m](z[m], other)
            pred = self.decoders[m]({m: (fused, masks[m].ids_restore)})[m]
            errors.append(patch_errors(pred, patchify(images[m], self.encoder.patch_size), self.cfg.norm_pix_loss))
        return {"recon": masked_mean(errors, [masks[m].mask for m in images])}

    def encode_kept(self, images: dict[str, Tensor], ids_keep: dict[str, Tensor | None]) -> dict[str, Tensor]:
        """Final encoder tokens per modality at the kept positions (all positions for None)."""
        if self.cfg.fusion == "xad":
            return {m: out.tokens for m, out in self.encoder(images, ids_keep).items()}
        tokens = {m: self.encoder.prepare(self.encoder.embed(x, m), ids_keep.get(m)) for m, x in images.items()}
        names = list(tokens)
        fused = [self.encoder_fusion(tokens[m], next((tokens[o] for o in names if o != m), None)) for m in names]
        x = torch.cat([self.cls_token.expand(fused[0].shape[0], -1, -1), *fused], dim=1)
        for block in self.encoder.blocks:
            x = block(x)
        parts = self.encoder.norm(x)[:, 1:].split([t.shape[1] for t in fused], dim=1)
        return dict(zip(names, parts))

    def encode(self, images: dict[str, Tensor]) -> dict[str, Tensor]:
        """All tokens of the modalities given, fused when both are given (see the module docstring
        for a missing modality)."""
        return self.encode_kept(images, {})
