"""Scoring a ready classifier (the authors' converted fine-tuned models) on a labelled class-folder set."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from codemae.data.transforms import Normalisation
from codemae.eval.data import EvalImages, LabelledSet
from codemae.eval.device import inference_autocast, module_device
from codemae.eval.features import eval_norms


@torch.no_grad()
def classify(model: nn.Module, data: LabelledSet, modality: str, size: int, norm: Normalisation | None = None,
             centre_crop: int | None = None, batch_size: int = 64) -> dict:
    """Overall accuracy (%) and per-class accuracy of ``model`` on every sample of ``data``, on the device
    ``model`` is on. ``norm``: the normalisation the model was fine-tuned with (default: statistics of
    ``data`` itself)."""
    norms = {modality: norm} if norm else eval_norms(data, (modality,), np.arange(len(data.labels)))
    images = EvalImages(data, (modality,), size, norms, centre_crop)
    device = module_device(model)
    with inference_autocast(device):
        predictions = torch.cat([model({modality: batch[modality].to(device)}).argmax(1).cpu()
                                 for batch in DataLoader(images, batch_size=batch_size)])
    labels = torch.as_tensor(data.labels)
    correct = (predictions == labels).float()
    per_class = {name: round(100 * correct[labels == c].mean().item(), 2)
                 for c, name in enumerate(data.classes) if (labels == c).any()}
    return {"accuracy": round(100 * correct.mean().item(), 2), "per_class": per_class, "samples": len(labels)}
