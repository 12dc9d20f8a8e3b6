"""Fus-MAE: cross-attention early (encoder) and feature-level (decoder) fusion (SPEC section 2).

- ``xaed`` (XAE&D): the encoder is :class:`~codemae.models.fusion.FusionViT`, whose first
  block is a cross-attention fusion block (see there).
- ``xad`` (XAD): the encoder runs each modality on its own (no cross-modal path);
  fusion happens only in the decoders.
- Before each modality's lightweight decoder: ``z' = z + CA(z, z_other)``, ``z' + MLP(z')``.
- Loss: per-patch MSE on masked patches of each modality, pooled.

Missing modality (single-modality evaluation): a fusion block with nothing to
attend to skips its cross-attention term and applies only its residual MLP.
Fus-MAE needs paired data (``needs_pairs``).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from codemae.batch import MODALITIES, Batch
from codemae.config import Config, MethodConfig
from codemae.errors import ConfigError
from codemae.losses import patch_errors, patchify, pooled_mean
from codemae.masking import modality_masks
from codemae.methods.base import PretrainMethod
from codemae.models.backbone import Encoder, gather_tokens
from codemae.models.build import build_backbone, build_fusion_encoder
from codemae.models.decoder import DecoderEmbed, MaskedDecoder
from codemae.models.fusion import CrossFusion
from codemae.models.vit import ViT


class FusMAE(PretrainMethod):
    needs_pairs: ClassVar[bool] = True

    @classmethod
    def build_encoder(cls, cfg: Config) -> Encoder:
        """XAE&D: the fusion encoder; XAD: a plain ViT shared by both modalities."""
        return build_fusion_encoder(cfg.model) if cfg.method.fusion == "xaed" else build_backbone(cfg.model)

    def __init__(self, encoder: Encoder, cfg: MethodConfig) -> None:
        super().__init__()
        if not isinstance(encoder, ViT):
            raise ConfigError("config key 'model.backbone': Fus-MAE needs a ViT backbone (vit_tiny, vit_small, vit_base)")
        self.cfg = cfg
        self.encoder = encoder
        self.decoder_embed = DecoderEmbed(encoder.level_dims, encoder.level_grids, cfg.decoder_dim, norm=False)
        self.decoder_fusion = nn.ModuleDict({m: CrossFusion(cfg.decoder_dim, cfg.decoder_heads) for m in MODALITIES})
        self.decoders = nn.ModuleDict({
            m: MaskedDecoder(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, encoder.grid,
                             {m: encoder.patch_size**2 * c})
            for m, c in encoder.channels.items()
        })

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        images = self.images(batch)
        first = next(iter(images.values()))
        masks = modality_masks(list(images), first.shape[0], self.encoder.num_patches, self.cfg.mask_ratios,
                               self.cfg.masking, first.device)
        latents = self.encoder(images, {m: masks[m].ids_keep for m in images})
        z = {m: self.decoder_embed(latents[m].levels) for m in images}
        errors = []
        for m in images:  # each decoder predicts its modality's masked patches only
            other = next((z[o] for o in images if o != m), None)
            fused = self.decoder_fusion[m](z[m], other)
            masked = masks[m].ids_masked
            pred = self.decoders[m]({m: (fused, masks[m].ids_restore)}, {m: masked})[m]
            target = gather_tokens(patchify(images[m], self.encoder.patch_size), masked)
            errors.append(patch_errors(pred, target, self.cfg.norm_pix_loss))
        return {"recon": pooled_mean(errors)}
