"""The contract every pretraining method follows."""

from __future__ import annotations

from torch import Tensor, nn

from codemae.models.backbone import MODALITIES, Backbone, PerModalityBackbones


class PretrainMethod(nn.Module):
    """A method owns an encoder; ``forward(batch)`` returns a dict of named loss terms.

    The batch is ``{"opt": (B,3,H,W) | None, "sar": (B,C,H,W) | None, "paired": bool}``.
    The engine optimises the sum of the returned terms and logs each one; it never
    needs to know which terms a method has.
    """

    encoder: Backbone | PerModalityBackbones

    def forward(self, batch: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    @staticmethod
    def images(batch: dict) -> dict[str, Tensor]:
        """The modalities present in a batch, optical first."""
        return {m: batch[m] for m in MODALITIES if batch.get(m) is not None}

    def encode(self, images: dict[str, Tensor]) -> dict[str, Tensor]:
        """Evaluation API: all tokens (B, N, D) per modality given, no masking.

        Give one modality (optical only, SAR only) or both; methods that fuse
        modalities override this to say how a missing modality is handled.
        """
        return {m: out.tokens for m, out in self.encoder(images).items()}
