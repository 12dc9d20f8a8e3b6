"""Linear probes on frozen features, with an honest and a reference protocol.

``codemae-linear`` (CoDe-MAE Table III, FG-MAE's recipe): fresh LayerNorm -> BatchNorm1d (no affine,
eps 1e-6) -> Linear (weights N(0, 0.01)); SGD lr 0.5, momentum 0.9, no weight decay, 50 epochs,
per-iteration cosine to 1e-6, batch 256. ``fusmae-linear`` (Fus-MAE's linear evaluation): a plain
Linear head trained with AdamW for 20 epochs, batch 128, on 1% of the training labels.
Multi-label data is trained with MultiLabelSoftMarginLoss, single-label with cross-entropy.

The head's state is kept after every epoch; after training, the honest protocol picks the epoch
with the best validation score (the last epoch when there is no validation split) and evaluates
the test set once; the reference protocol (the authors' code) reports the best test score over the
evaluations it makes, every 5 epochs and at the last, which is optimistic. Test labels are read
only after training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multilabel_average_precision,
)

LR, MOMENTUM, MIN_LR, EPOCHS, BATCH = 0.5, 0.9, 1e-6, 50, 256
REFERENCE_EVERY = 5


@dataclass(frozen=True)
class ProbeRecipe:
    optimizer: str                 # "sgd" (momentum 0.9) or "adamw"
    lr: float
    weight_decay: float
    epochs: int
    batch: int
    bn_head: bool                  # LN -> BN (no affine) -> Linear, or a plain Linear
    label_fraction: float | None   # train on this random fraction of the training set


RECIPES = {
    "codemae-linear": ProbeRecipe("sgd", LR, 0.0, EPOCHS, BATCH, True, None),
    "fusmae-linear": ProbeRecipe("adamw", 1e-3, 0.0, 20, 128, False, 0.01),
}


def build_head(dim: int, num_classes: int, bn: bool = True) -> nn.Sequential:
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    if not bn:
        return nn.Sequential(linear)
    return nn.Sequential(nn.LayerNorm(dim), nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def probe_optimizer(head: nn.Module, recipe: ProbeRecipe = RECIPES["codemae-linear"]) -> torch.optim.Optimizer:
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(head.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(head.parameters(), lr=recipe.lr, momentum=MOMENTUM, weight_decay=recipe.weight_decay)


def cosine_lr(step: int, total: int, peak: float = LR, floor: float = MIN_LR) -> float:
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def reference_epochs(epochs: int) -> list[int]:
    """The epochs (1-based) at which the reference code evaluates the test set: every 5th and the last."""
    return [e for e in range(1, epochs + 1) if e % REFERENCE_EVERY == 0 or e == epochs]


def score(logits: Tensor, labels: Tensor, multilabel: bool) -> float:
    """Overall accuracy (single-label) or micro mean average precision (multi-label), in %."""
    if multilabel:
        return 100 * multilabel_average_precision(logits.sigmoid(), labels.long(), labels.shape[1],
                                                  average="micro").item()
    return 100 * multiclass_accuracy(logits, labels, logits.shape[1], average="micro").item()


def metrics(logits: Tensor, labels: Tensor, multilabel: bool) -> dict[str, float]:
    """All reported metrics, in %: multi-label micro and macro mAP (macro over the labels present in
    ``labels``); single-label overall accuracy and SEN12MS-style weighted precision, recall and F1."""
    if multilabel:
        per_label = multilabel_average_precision(logits.sigmoid(), labels.long(), labels.shape[1], average="none")
        present = labels.sum(0) > 0
        return {"micro mAP": score(logits, labels, True), "macro mAP": 100 * per_label[present].mean().item()}
    c = logits.shape[1]
    return {"OA": score(logits, labels, False),
            "weighted precision": 100 * multiclass_precision(logits, labels, c, average="weighted").item(),
            "weighted recall": 100 * multiclass_recall(logits, labels, c, average="weighted").item(),
            "weighted F1": 100 * multiclass_f1_score(logits, labels, c, average="weighted").item()}


@dataclass
class ProbeResult:
    honest: float          # test score at the epoch chosen on validation (or the last epoch)
    honest_epoch: int
    reference: float       # best test score over the reference evaluations (optimistic)
    reference_curve: dict[int, float]  # epoch -> test score, at the epochs the reference code evaluates
    val_curve: list[float]
    honest_metrics: dict[str, float]


def train_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, test_x: Tensor,
                test_labels: Callable[[], Tensor], num_classes: int, multilabel: bool, seed: int,
                epochs: int | None = None, batch: int | None = None,
                recipe: ProbeRecipe = RECIPES["codemae-linear"]) -> ProbeResult:
    """Train the probe; ``test_labels`` is called once, after training. An empty ``val_x`` selects
    the last epoch for the honest protocol."""
    epochs, batch = epochs or recipe.epochs, batch or recipe.batch
    torch.manual_seed(seed)
    head = build_head(train_x.shape[1], num_classes, recipe.bn_head)
    optimizer = probe_optimizer(head, recipe)
    loss_fn = nn.MultiLabelSoftMarginLoss() if multilabel else nn.CrossEntropyLoss()
    steps_per_epoch = math.ceil(len(train_x) / batch)
    total, step = epochs * steps_per_epoch, 0
    states, val_curve = [], []
    for _ in range(epochs):
        head.train()
        order = torch.randperm(len(train_x))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            if len(idx) < 2 and recipe.bn_head:  # BatchNorm needs two samples
                continue
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, recipe.lr)
            loss = loss_fn(head(train_x[idx]), train_y[idx].float() if multilabel else train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        head.eval()
        if len(val_x):
            with torch.no_grad():
                val_curve.append(score(head(val_x), val_y, multilabel))
        states.append(copy.deepcopy(head.state_dict()))
    best = max(range(epochs), key=lambda e: val_curve[e]) if val_curve else epochs - 1
    labels = test_labels()

    def test_logits(epoch: int) -> Tensor:
        head.load_state_dict(states[epoch])
        with torch.no_grad():
            return head(test_x)

    honest_metrics = metrics(test_logits(best), labels, multilabel)
    curve = {e: score(test_logits(e - 1), labels, multilabel) for e in reference_epochs(epochs)}
    return ProbeResult(next(iter(honest_metrics.values())), best + 1, max(curve.values()), curve, val_curve,
                       honest_metrics)
