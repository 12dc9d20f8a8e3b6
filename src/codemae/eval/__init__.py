"""Downstream protocols on frozen or fine-tuned encoders of any method's checkpoint."""
