"""The vanilla joint MAE baseline: shared encoder, shared (or per-modality) decoder."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from codemae.config import MethodConfig
from codemae.losses import masked_mean, patch_errors, patchify
from codemae.masking import Mask, modality_masks
from codemae.methods.base import PretrainMethod
from codemae.models.backbone import MODALITIES, Backbone, PerModalityBackbones
from codemae.models.decoder import DecoderEmbed, MaskedDecoder


@dataclass
class Visible:
    """One modality after masking and encoding.

    ``tokens``: decoder-embedded visible tokens (B, L, decoder_dim), the input of
    every decoder and auxiliary loss; ``features``: the encoder's final tokens
    (B, L, embed_dim); ``hidden``: requested encoder block outputs.
    """

    mask: Mask
    tokens: Tensor
    features: Tensor
    hidden: dict[int, Tensor]


class JointMAE(PretrainMethod):
    """Joint optical + SAR MAE.

    Both modalities are masked (consistently by default), encoded by one shared
    trunk (or one per modality with ``encoder: independent``), embedded into the
    decoder from the pyramid levels and reconstructed by a shared decoder (or one
    per modality with ``decoder: independent``). Loss: norm-pix MSE on masked
    patches, pooled over both modalities.
    """

    def __init__(self, encoder: Backbone | PerModalityBackbones, cfg: MethodConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.decoder_embed = DecoderEmbed(encoder.level_dims, cfg.decoder_dim)
        pixels = {m: encoder.patch_size**2 * c for m, c in encoder.channels.items()}
        groups = {"shared": pixels} if cfg.decoder == "shared" else {m: {m: pixels[m]} for m in MODALITIES}
        self.decoders = nn.ModuleDict({
            name: MaskedDecoder(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, encoder.grid, outputs)
            for name, outputs in groups.items()
        })

    def forward(self, batch: dict) -> dict[str, Tensor]:
        images = self.images(batch)
        return {"recon": self.reconstruction(images, self.embed_visible(images))}

    def embed_visible(self, images: dict[str, Tensor], return_blocks: tuple[int, ...] = ()) -> dict[str, Visible]:
        """Mask, encode and decoder-embed each modality present."""
        first = next(iter(images.values()))
        p = self.encoder.patch_size
        num_patches = (first.shape[-2] // p) * (first.shape[-1] // p)
        masks = modality_masks(list(images), first.shape[0], num_patches, self.cfg.mask_ratios,
                               self.cfg.masking, first.device)
        encoded = self.encoder(images, {m: masks[m].ids_keep for m in images}, return_blocks)
        return {
            m: Visible(masks[m], self.decoder_embed(encoded[m].levels), encoded[m].tokens, encoded[m].hidden)
            for m in images
        }

    def reconstruction(self, images: dict[str, Tensor], visible: dict[str, Visible]) -> Tensor:
        """Norm-pix MSE on masked patches, pooled over all modalities' masked patches."""
        preds: dict[str, Tensor] = {}
        for name, decoder in self.decoders.items():
            mods = [m for m in images if name in ("shared", m)]
            if mods:
                preds.update(decoder({m: (visible[m].tokens, visible[m].mask.ids_restore) for m in mods}))
        p = self.encoder.patch_size
        errors = [patch_errors(preds[m], patchify(images[m], p), self.cfg.norm_pix_loss) for m in images]
        return masked_mean(errors, [visible[m].mask.mask for m in images])
