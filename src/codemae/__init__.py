"""codemae: joint optical + SAR masked-autoencoder pretraining, evaluation and analysis."""

__version__ = "0.1.0"
