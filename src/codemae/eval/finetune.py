"""Few-shot fine-tuning of a whole encoder with a BatchNorm + linear head.

Protocols (SPEC section 3):
- ``sar-target`` (MSTAR, FUSAR-Ship, SAR-ACD): AdamW wd 0.05, lr 1e-3 x batch/256, batch 50,
  60 epochs with 2 warm-up, layer-wise lr decay 0.85, drop path 0.05, no augmentation
  (inputs centre-cropped to 128 px, then resized to the model size).
- ``optical-scene`` (AID, RESISC45): 100 epochs with 5 warm-up, layer decay 0.85, drop path
  0.1, label smoothing 0.1, RandomResizedCrop + horizontal flip. RandAugment, mixup and
  cutmix of the paper's recipe are not implemented.
Each seed re-loads the pretrained weights and trains on its own K-shot draw; the test
set is evaluated once, after the last epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from codemae.data.transforms import crop_box
from codemae.errors import ConfigError
from codemae.eval.data import EvalImages, LabelledSet, split_indices
from codemae.eval.features import MODALITY_SETS, eval_norms, input_size
from codemae.eval.probe import score
from codemae.eval.protocols import SPLIT, training_indices
from codemae.eval.report import summarise
from codemae.methods import PretrainMethod
from codemae.train.optim import decays, declared_no_decay, lr_at


@dataclass(frozen=True)
class FinetuneProtocol:
    epochs: int
    warmup_epochs: int
    batch_size: int
    base_lr: float
    weight_decay: float
    layer_decay: float
    drop_path: float
    label_smoothing: float
    augment: bool
    centre_crop: int | None


PROTOCOLS = {
    "sar-target": FinetuneProtocol(60, 2, 50, 1e-3, 0.05, 0.85, 0.05, 0.0, False, 128),
    "optical-scene": FinetuneProtocol(100, 5, 50, 1e-3, 0.05, 0.85, 0.1, 0.1, True, None),
}


ENCODER_PREFIX = "method.encoder."


class Classifier(nn.Module):
    """Encoder tokens, mean-pooled (modalities concatenated), -> BatchNorm1d -> Linear."""

    def __init__(self, method: PretrainMethod, modalities: tuple[str, ...], num_classes: int) -> None:
        super().__init__()
        self.method, self.modalities = method, modalities
        dim = method.encoder.embed_dim * len(modalities)
        self.norm = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: dict[str, Tensor]) -> Tensor:
        tokens = self.method.encode({m: images[m] for m in self.modalities})
        return self.head(self.norm(torch.cat([tokens[m].mean(1) for m in self.modalities], dim=-1)))


def layer_decay_groups(model: Classifier, lr: float, weight_decay: float, decay: float) -> list[dict]:
    """AdamW parameter groups with lr x decay^(num_layers - layer), layers as the encoder numbers them
    (the head and everything outside the encoder at the top), and weight decay where the optimiser
    rules put it."""
    encoder = model.method.encoder
    num_layers = encoder.num_layers
    no_decay = declared_no_decay(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        inside = name.startswith(ENCODER_PREFIX)
        layer = encoder.layer_id(name[len(ENCODER_PREFIX):]) if inside else num_layers
        decayed = decays(name, param, no_decay)
        group = groups.setdefault((layer, decayed), {
            "params": [], "weight_decay": weight_decay if decayed else 0.0,
            "lr_scale": decay ** (num_layers - layer), "lr": lr,
        })
        group["params"].append(param)
    return list(groups.values())


def augment(images: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """Batch RandomResizedCrop (scale 0.08-1) + horizontal flip, the same box for every modality."""
    out = {m: x.clone() for m, x in images.items()}
    size = next(iter(images.values())).shape[-1]
    for i in range(next(iter(images.values())).shape[0]):
        top, left, h, w = crop_box(size, size, (0.08, 1.0), (3 / 4, 4 / 3), generator)
        flip = bool(torch.rand(1, generator=generator) < 0.5)
        for m, x in images.items():
            crop = F.interpolate(x[i : i + 1, :, top : top + h, left : left + w], size=(size, size), mode="bilinear",
                                 align_corners=False)[0]
            out[m][i] = crop.flip(-1) if flip else crop
    return out


def finetune_once(model: Classifier, train: DataLoader, test: DataLoader, protocol: FinetuneProtocol,
                  seed: int) -> float:
    """Train ``model`` end to end on ``train``; return the test accuracy after the last epoch (%)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    lr = protocol.base_lr * protocol.batch_size / 256
    optimizer = torch.optim.AdamW(layer_decay_groups(model, lr, protocol.weight_decay, protocol.layer_decay),
                                  betas=(0.9, 0.999))
    steps_per_epoch = len(train)
    total, warmup, step = protocol.epochs * steps_per_epoch, protocol.warmup_epochs * steps_per_epoch, 0
    for _ in range(protocol.epochs):
        model.train()
        for batch, labels in train:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, lr, warmup, total) * group["lr_scale"]
            images = augment(batch, generator) if protocol.augment else batch
            loss = F.cross_entropy(model(images), labels, label_smoothing=protocol.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    model.eval()
    with torch.no_grad():
        logits, targets = zip(*((model(batch), labels) for batch, labels in test))
    return score(torch.cat(logits), torch.cat(targets), multilabel=False)


class WithLabels(torch.utils.data.Dataset):
    def __init__(self, images: EvalImages, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def run_finetune(load, data: LabelledSet, modality: str, shots: int, mode: str, seeds: list[int],
                 protocol: FinetuneProtocol) -> dict:
    """``load()`` returns a fresh pretrained method (with the protocol's drop path) for every seed."""
    if data.multilabel:
        raise ConfigError("fine-tuning is single-label classification; use the probe for multi-label data")
    mods = MODALITY_SETS[modality]
    split = split_indices(data.labels, SPLIT)
    probe_method = load()
    images = WithLabels(EvalImages(data, mods, input_size(probe_method), eval_norms(data, mods, split["pool"]),
                                   protocol.centre_crop), data.labels)
    cached = [images[i] for i in range(len(images))]  # decode once, reuse for every seed
    test = DataLoader(Subset(cached, split["test"].tolist()), batch_size=100)
    per_seed = []
    for seed in seeds:
        train_idx = training_indices(data, split["pool"], shots, mode, seed)
        batch = min(protocol.batch_size, len(train_idx))
        train = DataLoader(Subset(cached, train_idx.tolist()), batch_size=batch, shuffle=True, drop_last=True,
                           generator=torch.Generator().manual_seed(seed))
        model = Classifier(load(), mods, len(data.classes))
        per_seed.append({"test accuracy (last epoch)": finetune_once(model, train, test, protocol, seed)})
    return {"summary": summarise(per_seed), "train_size": len(train_idx), "test_size": len(split["test"]),
            "epochs": protocol.epochs}
