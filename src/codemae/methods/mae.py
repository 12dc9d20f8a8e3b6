"""The vanilla joint MAE baseline: shared encoder, shared (or per-modality) decoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codemae.config import MethodConfig
from codemae.losses import masked_mean, patch_errors, patchify
from codemae.masking import modality_masks
from codemae.methods.base import PretrainMethod
from codemae.models.backbone import MODALITIES, Backbone
from codemae.models.decoder import DecoderEmbed, MaskedDecoder


class JointMAE(PretrainMethod):
    """Joint optical + SAR MAE.

    Both modalities are masked (consistently by default), encoded by one shared
    trunk, embedded into the decoder from the pyramid levels and reconstructed by a
    shared decoder (or one decoder per modality with ``decoder: independent``).
    Loss: norm-pix MSE on masked patches, pooled over both modalities.
    """

    def __init__(self, encoder: Backbone, cfg: MethodConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.decoder_embed = DecoderEmbed(encoder.level_dims, cfg.decoder_dim)
        make = lambda channels: MaskedDecoder(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,  # noqa: E731
                                              encoder.grid, encoder.patch_size, channels)
        if cfg.decoder == "shared":
            self.decoders = nn.ModuleDict({"shared": make(encoder.channels)})
        else:
            self.decoders = nn.ModuleDict({m: make({m: encoder.channels[m]}) for m in MODALITIES})

    def forward(self, batch: dict) -> dict[str, Tensor]:
        images = self.images(batch)
        return {"recon": self.reconstruction(images, self.embed_visible(images, batch.get("generator")))}

    def embed_visible(self, images: dict[str, Tensor], generator: torch.Generator | None = None) -> dict:
        """Mask, encode and decoder-embed each modality: ``{m: (mask, visible decoder tokens)}``."""
        first = next(iter(images.values()))
        num_patches = (first.shape[-2] // self.encoder.patch_size) * (first.shape[-1] // self.encoder.patch_size)
        masks = modality_masks(list(images), first.shape[0], num_patches, self.cfg.mask_ratio,
                               self.cfg.masking, first.device, generator)
        encoded = self.encoder(images, {m: masks[m].ids_keep for m in images})
        return {m: (masks[m], self.decoder_embed(encoded[m].levels)) for m in images}

    def reconstruction(self, images: dict[str, Tensor], visible: dict) -> Tensor:
        """Norm-pix MSE on masked patches, pooled over all modalities' masked patches."""
        preds: dict[str, Tensor] = {}
        for name, decoder in self.decoders.items():
            mods = [m for m in images if name in ("shared", m)]
            if mods:
                preds.update(decoder({m: (visible[m][1], visible[m][0].ids_restore) for m in mods}))
        p = self.encoder.patch_size
        errors = [patch_errors(preds[m], patchify(images[m], p), self.cfg.norm_pix_loss) for m in images]
        return masked_mean(errors, [visible[m][0].mask for m in images])
