"""Weighted k-NN classification on frozen features (DINO's protocol: cosine, k=20, T=0.07)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from codemae.eval.probe import score


def knn_predict(train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07) -> Tensor:
    """Class scores (N_test, C): each of the k most cosine-similar training samples votes for its
    class with weight exp(similarity / temperature)."""
    sims = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T
    top, idx = sims.topk(min(k, len(train_x)), dim=1)
    votes = torch.zeros(len(test_x), num_classes)
    votes.scatter_add_(1, train_y[idx], (top / temperature).exp())
    return votes


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int,
                 k: int = 20) -> float:
    """Overall accuracy (%) of the weighted k-NN votes."""
    return score(knn_predict(train_x, train_y, test_x, num_classes, k), test_y, multilabel=False)
