"""Mechanism analyses (paper Sec. IV-C) as tools for any checkpoint: spectrum and effective rank,
paired-embedding projection, patch alignment vs SSIM, reconstructions, an HTML report."""
