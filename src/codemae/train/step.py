"""One optimisation step in pieces: the engine composes them (with accumulation, reduction and the
non-finite guard) and ``codemae bench`` times them one by one, so both measure the same code."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codemae.batch import Batch
from codemae.train.accel import resolve_precision


class TrainStep:
    """Forward (under bf16 autocast when asked; ``auto``: on CUDA), backward, gradient clipping and the update of
    ``optimizer``'s parameters. ``model`` is the method or its DDP wrapper."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "fp32", clip_grad: float | None = None) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device
        self.bf16 = resolve_precision(precision, device) == "bf16"
        self.clip_grad = clip_grad or float("inf")
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """The method's named loss terms."""
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
            return self.model(batch)

    @staticmethod
    def backward(terms: dict[str, Tensor], scale: float = 1.0) -> None:
        """Accumulate the gradient of ``scale`` x the sum of the terms."""
        (sum(terms.values()) * scale).backward()

    def clip(self) -> float:
        """Clip the accumulated gradient to ``clip_grad`` (if set); its norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad))

    def apply(self, update: bool = True) -> None:
        """Take the optimiser step (unless ``update`` is False) and clear the gradients."""
        if update:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
