"""The vanilla joint MAE baseline: shared encoder, shared (or per-modality) decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from codemae.batch import MODALITIES, Batch
from codemae.config import MethodConfig
from codemae.losses import denormalise, patch_errors, patchify, pooled_mean, unpatchify
from codemae.masking import Mask, modality_masks
from codemae.methods.base import PretrainMethod
from codemae.models.backbone import Encoder, gather_tokens
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
    decoder from the pyramid levels and reconstructed by a shared decoder (or, with
    ``decoder: independent``, one decoder and one decoder embedding per modality, as published). Loss: norm-pix MSE on masked
    patches, pooled over both modalities.
    """

    def __init__(self, encoder: Encoder, cfg: MethodConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        pixels = {m: encoder.patch_size**2 * c for m, c in encoder.channels.items()}
        groups = {"shared": pixels} if cfg.decoder == "shared" else {m: {m: pixels[m]} for m in MODALITIES}
        self.decoder_embed = nn.ModuleDict({name: self.level_embedding() for name in groups})
        self.decoders = nn.ModuleDict({name: self.masked_decoder(outputs) for name, outputs in groups.items()})

    def level_embedding(self) -> DecoderEmbed:
        """The embedding of the encoder's levels at the decoder width, in the encoder family's form."""
        e = self.encoder
        return DecoderEmbed(e.level_dims, e.level_grids, self.cfg.decoder_dim, norm=e.layout == "itpn")

    def masked_decoder(self, outputs: dict[str, int], depth: int | None = None) -> MaskedDecoder:
        """A decoder at the configured width predicting ``outputs`` values per patch and modality."""
        copies = len(self.encoder.level_dims) if self.cfg.mask_token_per_level else 1
        return MaskedDecoder(self.cfg.decoder_dim, depth or self.cfg.decoder_depth, self.cfg.decoder_heads,
                             self.encoder.grid, outputs, copies)

    def group_of(self, modality: str) -> str:
        """The decoder (and decoder embedding) that serves ``modality``."""
        return "shared" if "shared" in self.decoders else modality

    def forward(self, batch: Batch) -> dict[str, Tensor]:
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
            m: Visible(masks[m], self.decoder_embed[self.group_of(m)](encoded[m].levels), encoded[m].tokens,
                       encoded[m].hidden)
            for m in images
        }

    def decode(self, visible: dict[str, Visible], positions: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Each modality's predicted patches (B, N, P*P*C) from its decoder; with ``positions[m]`` (B, M)
        only those patches, (B, M, P*P*C) (see :class:`~codemae.models.decoder.MaskedDecoder`)."""
        preds: dict[str, Tensor] = {}
        for name, decoder in self.decoders.items():
            mods = [m for m in visible if name in ("shared", m)]
            if mods:
                inputs = {m: (visible[m].tokens, visible[m].mask.ids_restore) for m in mods}
                preds.update(decoder(inputs, None if positions is None else {m: positions[m] for m in mods}))
        return preds

    def reconstruction(self, images: dict[str, Tensor], visible: dict[str, Visible]) -> Tensor:
        """Norm-pix MSE on masked patches, pooled over all modalities' masked patches (the decoder
        predicts those patches only)."""
        masked = {m: visible[m].mask.ids_masked for m in images}
        preds = self.decode(visible, masked)
        p = self.encoder.patch_size
        targets = {m: gather_tokens(patchify(images[m], p), masked[m]) for m in images}
        return pooled_mean([patch_errors(preds[m], targets[m], self.cfg.norm_pix_loss) for m in images])

    @torch.no_grad()
    def reconstruct(self, images: dict[str, Tensor]) -> dict[str, Tensor]:
        """For inspection: ``<m>_mask`` (B, N, 1 = masked) and ``<m>_recon`` (B, C, H, W), the
        masked patches predicted and the visible ones copied from the input."""
        visible = self.embed_visible(images)
        preds = self.decode(visible)
        out = {}
        for m, image in images.items():
            out[f"{m}_mask"] = visible[m].mask.mask
            out[f"{m}_recon"] = self.paste(preds[m], image, visible[m].mask.mask, self.cfg.norm_pix_loss)
        return out | self.cross_reconstructions(images, visible)

    def cross_reconstructions(self, images: dict[str, Tensor], visible: dict[str, Visible]) -> dict[str, Tensor]:
        """Cross-modal reconstructions a method adds to :meth:`reconstruct` (none here)."""
        return {}

    def paste(self, pred: Tensor, target_image: Tensor, mask: Tensor, norm_pix: bool) -> Tensor:
        """Predicted patches where masked, the target's where visible, as an image."""
        p = self.encoder.patch_size
        target = patchify(target_image, p)
        pred = denormalise(pred, target) if norm_pix else pred
        return unpatchify(pred * mask[..., None] + target * (1 - mask[..., None]), p, target_image.shape[1])
