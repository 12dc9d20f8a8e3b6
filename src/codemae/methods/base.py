"""The contract every pretraining method follows."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from codemae.batch import Batch, images_of
from codemae.config import Config
from codemae.models.attention import INITS
from codemae.models.backbone import Encoder, EncoderOutput
from codemae.models.build import build_encoder
from codemae.models.teacher import Teacher


class PretrainMethod(nn.Module):
    """A method owns an encoder; ``forward(batch)`` returns a dict of named loss terms.

    The batch follows :class:`codemae.batch.Batch`. The engine optimises the sum of the
    returned terms and logs each one; it never needs to know which terms a method has.
    ``needs_pairs``: the method fuses the two images of a pair and refuses unpaired data.
    """

    encoder: Encoder
    needs_pairs: ClassVar[bool] = False
    encoder_only = False  # True for an export's method: its decoders were never trained

    @classmethod
    def build_encoder(cls, cfg: Config) -> Encoder:
        """The encoder this method is built around, freshly initialised."""
        return build_encoder(cfg.model, cfg.method.encoder)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def init_layers(self) -> PretrainMethod:
        """Initialise every linear and norm layer outside the encoder as the encoder's published family
        does (MAE's xavier-uniform for ViTs, iTPN's N(0, 0.02) for HiViT); tokens keep their own init."""
        init = INITS[self.encoder.layout]
        for name, child in self.named_children():
            if name != "encoder":
                child.apply(init)
        return self

    images = staticmethod(images_of)

    @property
    def uses_teacher(self) -> bool:
        """Whether the method learns from a frozen teacher (see :func:`codemae.loading.prepare_teacher`)."""
        return False

    def attach_teacher(self, teacher: Teacher | None) -> None:
        raise TypeError(f"{type(self).__name__} learns from no teacher")

    def encode_outputs(self, images: dict[str, Tensor]) -> dict[str, EncoderOutput]:
        """Evaluation API: final tokens (B, N, D) and pyramid levels per modality given, no masking.

        Give one modality (optical only, SAR only) or both; an encoder that fuses
        modalities says how a missing one is handled.
        """
        return self.encoder(images)

    def encode(self, images: dict[str, Tensor]) -> dict[str, Tensor]:
        """All final tokens (B, N, D) per modality given, no masking."""
        return {m: out.tokens for m, out in self.encode_outputs(images).items()}

    def reconstruct(self, images: dict[str, Tensor]) -> dict[str, Tensor]:
        """For inspection: ``<m>_mask`` and ``<m>_recon`` images; empty for methods that reconstruct nothing."""
        return {}
