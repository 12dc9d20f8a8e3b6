"""Encoders to evaluate (any method's checkpoint, or a random initialisation) and frozen features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from codemae.config import load_config
from codemae.data.stats import compute_stats
from codemae.data.transforms import Normalisation
from codemae.errors import ConfigError
from codemae.eval.data import EvalImages, LabelledSet
from codemae.eval.device import inference_autocast, module_device
from codemae.export import load_export_method
from codemae.loading import load_method
from codemae.methods import PretrainMethod, build_method

MODALITY_SETS = {"opt": ("opt",), "sar": ("sar",), "both": ("opt", "sar")}


def method_to_evaluate(checkpoint: str | None, random_config: str | None = None, seed: int = 0,
                 drop_path: float | None = None) -> PretrainMethod:
    """A trained method from ``checkpoint`` (a checkpoint file or an export folder), or (``random_config``)
    the configured one freshly initialised: the floor every result is compared with."""
    if (checkpoint is None) == (random_config is None):
        raise ConfigError("give exactly one of --checkpoint and --random CONFIG")
    if checkpoint is not None and Path(checkpoint).is_dir():  # an export folder (codemae export / convert)
        return load_export_method(checkpoint, drop_path)
    if checkpoint is not None:
        return load_method(checkpoint, drop_path)
    cfg = load_config(random_config, [f"model.drop_path={drop_path}"] if drop_path is not None else [])
    torch.manual_seed(seed)
    return build_method(cfg).eval()


def input_size(method: PretrainMethod) -> int:
    return method.encoder.img_size


def eval_norms(data: LabelledSet, modalities: tuple[str, ...], indices: np.ndarray) -> dict[str, Normalisation]:
    """Downstream normalisation: statistics of the training pool, not of the pretraining data."""
    stats = compute_stats(data.source, 256, indices)
    return {m: stats[m] for m in modalities}


@torch.no_grad()
def extract_features(method: PretrainMethod, images: EvalImages, batch_size: int = 64, workers: int = 0,
                     device: str | torch.device | None = None) -> Tensor:
    """Mean-pooled final tokens per sample (float32, on the CPU); with both modalities, optical then SAR
    concatenated. Runs on ``device`` (default: where the method is), in bf16 autocast on CUDA."""
    device = torch.device(device) if device is not None else module_device(method)
    method.eval().to(device)
    loader = DataLoader(images, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    feats = []
    for batch in loader:
        with inference_autocast(device):
            tokens = method.encode({m: batch[m].to(device, non_blocking=True) for m in images.modalities})
        feats.append(torch.cat([tokens[m].float().mean(1) for m in images.modalities], dim=-1).cpu())
    return torch.cat(feats)
