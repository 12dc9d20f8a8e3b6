"""Everything the analyses need from one checkpoint on a set of co-registered pairs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from codemae.analysis.measures import patch_alignment, patch_ssim, reconstruction_errors, smooth_field_errors
from codemae.data.sources import Source
from codemae.data.stats import compute_stats
from codemae.eval.device import inference_autocast, module_device
from codemae.methods import PretrainMethod
from codemae.methods.cdr_targets import grayscale

RECONSTRUCTED = 4  # pairs shown in the reconstruction figure


@dataclass
class Reconstructed:
    """A method's reconstructions of one image set: the first :data:`RECONSTRUCTED` inputs and their
    reconstructions (``<m>_recon``, ``<m>_mask``, ``cdr_recon``), and per modality the masked-patch squared
    error over all images divided by that of the same reconstructions flattened to their patch means
    (:func:`~codemae.analysis.measures.reconstruction_errors`), beside the smooth-field yardstick on the same
    images (:func:`~codemae.analysis.measures.smooth_field_errors`). All empty for a method without pixel
    decoder."""

    inputs: dict[str, Tensor]
    shown: dict[str, Tensor]
    error_ratio: dict[str, float]
    reference_ratio: dict[str, float]
    count: int  # images measured


@dataclass
class Collected:
    """Per pair: pooled embeddings (N, D), patch alignment and patch SSIM (N, P); the reconstructions of the
    pairs, and of a set of unpaired images when one was given (``images_name`` says which)."""

    opt: Tensor
    sar: Tensor
    alignment: Tensor
    ssim: Tensor
    recon: Reconstructed
    images: Reconstructed | None = None
    images_name: str = ""

    def reconstruction_sets(self) -> list[tuple[str, Reconstructed]]:
        """The pairs' reconstructions (named "") and the unpaired images' (named ``images_name``) if any."""
        return [("", self.recon)] + ([(self.images_name, self.images)] if self.images else [])


def spread(n: int, count: int) -> np.ndarray:
    """``count`` indices (all if fewer) spread evenly over ``range(n)``: every class of a class-sorted list."""
    return np.unique(np.linspace(0, n - 1, num=min(n, count)).round().astype(int))


def unit_images(source: Source, indices: np.ndarray, size: int) -> dict[str, Tensor]:
    """The samples ``indices`` of each of the source's modalities as [0, 1] tensors, each resized to the
    model's input size (the images may differ in size)."""
    arrays = [source.load(int(i)) for i in indices]

    def resized(array: np.ndarray) -> Tensor:
        x = torch.from_numpy(np.nan_to_num(array, nan=0.0)).permute(2, 0, 1)[None]  # nodata: 0
        return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)

    return {m: torch.cat([resized(a[m]) for a in arrays]).clamp(0, 1) for m in source.modalities}


def model_inputs(source: Source, indices: np.ndarray, size: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The [0, 1] images (:func:`unit_images`) and the same normalised with their own statistics."""
    units = unit_images(source, indices, size)
    stats = compute_stats(source, 256, indices)
    return units, {m: stats[m](x) for m, x in units.items()}


@torch.no_grad()
def collect(method: PretrainMethod, source: Source, count: int = 200, batch: int = 50, seed: int = 0,
            images: Source | None = None, images_name: str = "") -> Collected:
    """Encode each modality of each pair on its own (no masking), where the method is (bf16 autocast on
    CUDA); SSIM on the [0, 1] inputs (grayscale optical vs SAR channel mean), in the model's patches; the
    reconstructions of the first ``count`` pairs and of ``count`` unpaired ``images`` spread over them (one
    modality, e.g. SAR chips; not loaded for an export, whose decoders were left out)."""
    method.eval()
    device = module_device(method)
    encoder = method.encoder
    units, inputs = model_inputs(source, np.arange(min(count, len(source))), encoder.img_size)
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
    recon = reconstructed(method, inputs, batch)
    unpaired = None
    if images is not None and not method.encoder_only:
        picks = spread(len(images), count)
        unpaired = reconstructed(method, model_inputs(images, picks, encoder.img_size)[1], batch)
    return Collected(torch.cat(pooled["opt"]), torch.cat(pooled["sar"]), torch.cat(aligned), ssim, recon,
                     unpaired, images_name or (images.name if images else ""))


def reconstructed(method: PretrainMethod, inputs: dict[str, Tensor], batch: int) -> Reconstructed:
    """The method's reconstructions of ``inputs`` (normalised images of one or both modalities), shown and
    measured (:class:`Reconstructed`)."""
    count = len(next(iter(inputs.values())))
    if method.encoder_only:
        return Reconstructed({}, {}, {}, {}, count)
    device, patch = module_device(method), method.encoder.patch_size
    sums: dict[str, list[float]] = {}
    shown: dict[str, Tensor] = {}
    for start in range(0, count, batch):
        part = {m: x[start : start + batch] for m, x in inputs.items()}
        out = {k: v.float().cpu() for k, v in method.reconstruct({m: x.to(device) for m, x in part.items()}).items()}
        shown = shown or {k: v[:RECONSTRUCTED] for k, v in out.items()}
        for m in (m for m in part if f"{m}_recon" in out):  # none for a method that reconstructs nothing (Fus-MAE)
            errors = reconstruction_errors(out[f"{m}_recon"], part[m], out[f"{m}_mask"], patch)
            sums[m] = [total + e for total, e in zip(sums.get(m, [0.0, 0.0]), errors)]
    ratio = lambda errors: errors[0] / max(errors[1], 1e-12)  # noqa: E731
    return Reconstructed({m: x[:RECONSTRUCTED] for m, x in inputs.items()} if shown else {}, shown,
                         {m: ratio(e) for m, e in sums.items()},
                         {m: ratio(smooth_field_errors(inputs[m], patch)) for m in sums}, count)
