"""The paper's linear probe on frozen features, with an honest and a reference protocol.

Head: fresh LayerNorm -> BatchNorm1d (no affine, eps 1e-6) -> Linear (weights N(0, 0.01)).
SGD lr 0.5, momentum 0.9, no weight decay, 50 epochs, per-iteration cosine to 1e-6,
batch 256. The head's state is kept after every epoch; after training, the honest
protocol picks the epoch with the best validation score and evaluates the test
set once; the reference protocol (the authors' code) reports the best test score
over all epochs, which is optimistic. Test labels are read only after training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy, multilabel_average_precision

LR, MOMENTUM, MIN_LR, EPOCHS, BATCH = 0.5, 0.9, 1e-6, 50, 256


def build_head(dim: int, num_classes: int) -> nn.Sequential:
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.LayerNorm(dim), nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def probe_optimizer(head: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=0.0)


def cosine_lr(step: int, total: int, peak: float = LR, floor: float = MIN_LR) -> float:
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def score(logits: Tensor, labels: Tensor, multilabel: bool) -> float:
    """Overall accuracy (single-label) or micro mean average precision (multi-label), in %."""
    if multilabel:
        return 100 * multilabel_average_precision(logits.sigmoid(), labels.long(), labels.shape[1],
                                                  average="micro").item()
    return 100 * multiclass_accuracy(logits, labels, logits.shape[1], average="micro").item()


@dataclass
class ProbeResult:
    honest: float          # test score at the epoch chosen on validation
    honest_epoch: int
    reference: float       # best test score over epochs (optimistic)
    val_curve: list[float]


def train_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, test_x: Tensor,
                test_labels: Callable[[], Tensor], num_classes: int, multilabel: bool, seed: int,
                epochs: int = EPOCHS, batch: int = BATCH) -> ProbeResult:
    """Train the probe; ``test_labels`` is called once, after training."""
    torch.manual_seed(seed)
    head = build_head(train_x.shape[1], num_classes)
    optimizer = probe_optimizer(head)
    loss_fn = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    steps_per_epoch = math.ceil(len(train_x) / batch)
    total, step = epochs * steps_per_epoch, 0
    states, val_curve = [], []
    for _ in range(epochs):
        head.train()
        order = torch.randperm(len(train_x))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total)
            loss = loss_fn(head(train_x[idx]), train_y[idx].float() if multilabel else train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        head.eval()
        with torch.no_grad():
            val_curve.append(score(head(val_x), val_y, multilabel))
        states.append(copy.deepcopy(head.state_dict()))
    best = max(range(epochs), key=lambda e: val_curve[e])
    labels = test_labels()

    def test_score(state: dict) -> float:
        head.load_state_dict(state)
        with torch.no_grad():
            return score(head(test_x), labels, multilabel)

    honest = test_score(states[best])
    reference = max(test_score(state) for state in states)
    return ProbeResult(honest, best + 1, reference, val_curve)
