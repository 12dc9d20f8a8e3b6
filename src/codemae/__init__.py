"""codemae: joint optical + SAR masked-autoencoder pretraining, evaluation and analysis."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from codemae.export import ExportedEncoder


def load_encoder(directory: str, device: str = "cpu") -> ExportedEncoder:
    """Load an encoder written by ``codemae export`` (see :func:`codemae.export.load_encoder`): an
    ``nn.Module`` whose ``forward(images, modality)`` takes raw [0, 1] images, applies the stored
    normalisation and returns the (B, D) pooled embedding."""
    from codemae.export import load_encoder as load

    return load(directory, device)
