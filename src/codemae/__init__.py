"""codemae: joint optical + SAR masked-autoencoder pretraining, evaluation and analysis."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from codemae.methods.base import PretrainMethod


def load_encoder(directory: str, device: str = "cpu") -> PretrainMethod:
    """Load an encoder written by ``codemae export`` (see :func:`codemae.export.load_encoder`)."""
    from codemae.export import load_encoder as load

    return load(directory, device)
