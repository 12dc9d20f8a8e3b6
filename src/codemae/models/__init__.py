"""Backbones, shared attention blocks and decoders."""
