"""Everything the analyses need from one checkpoint on a set of co-registered pairs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from codemae.analysis.measures import patch_alignment, patch_ssim, reconstruction_errors
from codemae.data.sources import Source
from codemae.data.stats import compute_stats
from codemae.eval.device import inference_autocast, module_device
from codemae.methods import PretrainMethod
from codemae.methods.cdr_targets import grayscale

RECONSTRUCTED = 4  # pairs shown in the reconstruction figure


@dataclass
class Collected:
    """Per pair: pooled embeddings (N, D), patch alignment and patch SSIM (N, P); the model
    inputs and the method's reconstructions of the first pairs, and per modality the masked-patch
    squared error of its reconstructions over all pairs divided by that of the same reconstructions
    flattened to their patch means (both empty if it has no pixel decoder)."""

    opt: Tensor
    sar: Tensor
    alignment: Tensor
    ssim: Tensor
    inputs: dict[str, Tensor]
    reconstructions: dict[str, Tensor]
    recon_error_ratio: dict[str, float]


def unit_images(source: Source, count: int, size: int) -> dict[str, Tensor]:
    """The first ``count`` pairs as [0, 1] tensors resized to the model's input size."""
    arrays = [source.load(i) for i in range(min(count, len(source)))]
    return {
        m: F.interpolate(torch.from_numpy(np.nan_to_num(np.stack([a[m] for a in arrays]), nan=0.0))  # nodata: 0
                         .permute(0, 3, 1, 2), size=(size, size),
                         mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        for m in ("opt", "sar")
    }


@torch.no_grad()
def collect(method: PretrainMethod, source: Source, count: int = 200, batch: int = 50, seed: int = 0) -> Collected:
    """Encode each modality of each pair on its own (no masking), where the method is (bf16 autocast on
    CUDA); SSIM on the [0, 1] inputs (grayscale optical vs SAR channel mean), in the model's patches."""
    method.eval()
    device = module_device(method)
    encoder = method.encoder
    units = unit_images(source, count, encoder.img_size)
    stats = compute_stats(source, 256, np.arange(min(count, len(source))))
    inputs = {m: stats[m](x) for m, x in units.items()}
    pooled: dict[str, list[Tensor]] = {"opt": [], "sar": []}
    aligned = []
    for start in range(0, len(inputs["opt"]), batch):
        with inference_autocast(device):
            tokens = {m: method.encode({m: x[start : start + batch].to(device)})[m] for m, x in inputs.items()}
        tokens = {m: t.float().cpu() for m, t in tokens.items()}
        for m in pooled:
            pooled[m].append(tokens[m].mean(1))
        aligned.append(patch_alignment(tokens["opt"], tokens["sar"]))
    ssim = patch_ssim(grayscale(units["opt"]), units["sar"].mean(1, keepdim=True), encoder.patch_size)
    torch.manual_seed(seed)
    recon, ratios = ({}, {}) if method.encoder_only else reconstructions(method, inputs, batch)
    return Collected(torch.cat(pooled["opt"]), torch.cat(pooled["sar"]), torch.cat(aligned), ssim,
                     {m: x[:RECONSTRUCTED] for m, x in inputs.items()}, recon, ratios)


def reconstructions(method: PretrainMethod, inputs: dict[str, Tensor], batch: int) -> tuple[dict[str, Tensor],
                                                                                         dict[str, float]]:
    """The method's reconstructions of the first :data:`RECONSTRUCTED` pairs, and per modality the
    masked-patch squared error over all pairs relative to the flattened reconstructions'
    (:func:`~codemae.analysis.measures.reconstruction_errors`)."""
    device, patch = module_device(method), method.encoder.patch_size
    sums: dict[str, list[float]] = {}
    shown: dict[str, Tensor] = {}
    for start in range(0, len(inputs["opt"]), batch):
        part = {m: x[start : start + batch] for m, x in inputs.items()}
        out = {k: v.float().cpu() for k, v in method.reconstruct({m: x.to(device) for m, x in part.items()}).items()}
        shown = shown or {k: v[:RECONSTRUCTED] for k, v in out.items()}
        for m in (m for m in part if f"{m}_recon" in out):  # none for a method that reconstructs nothing (Fus-MAE)
            errors = reconstruction_errors(out[f"{m}_recon"], part[m], out[f"{m}_mask"], patch)
            sums[m] = [total + e for total, e in zip(sums.get(m, [0.0, 0.0]), errors)]
    return shown, {m: model / max(means, 1e-12) for m, (model, means) in sums.items()}
