"""AdamW with weight decay where the models declare it, the linear lr scaling rule and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

def declared_no_decay(model: nn.Module) -> set[str]:
    """Full names of the parameters that ``model``'s submodules declare free of weight decay
    (``no_weight_decay()``, the timm habit: position embeddings, mask and class tokens)."""
    names = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return names


def decays(name: str, param: nn.Parameter, no_decay: set[str]) -> bool:
    """Whether weight decay applies: not to biases and norms (1-d) nor to the declared names."""
    return param.ndim > 1 and name not in no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and biases / norms / declared embeddings and tokens without decay."""
    no_decay = declared_no_decay(model)
    decay, keep = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param, no_decay) else keep).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused (single-kernel) AdamW


def adamw_kind(model: nn.Module) -> dict[str, bool]:
    """``fused=True`` when every parameter is a floating tensor on a device with a fused AdamW (the same
    update as the per-parameter loop, one kernel instead of a dozen per tensor), else torch's default."""
    params = list(model.parameters())
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return {"fused": True} if fused else {}


def pretraining_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: list[float]) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused where the device allows (build it after moving ``model``)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(betas[0], betas[1]),
                             **adamw_kind(model))


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule: ``base_lr * effective_batch / 256``."""
    return base_lr * effective_batch / 256


def lr_at(step: float, peak: float, warmup_steps: float, total_steps: float, min_lr: float = 0.0) -> float:
    """Per-iteration schedule: linear warm-up to ``peak``, then half-cycle cosine to ``min_lr``."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1e-12)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def poly_lr_at(step: int, base: float, total_steps: int, power: float = 1.0, min_lr: float = 0.0,
               warmup_steps: int = 0, warmup_start: float = 1e-6) -> float:
    """mmengine's LinearLR (``end=warmup_steps``) then PolyLR (``begin=warmup_steps, end=total_steps``) in
    closed form, per iteration. Both span ``end - begin - 1`` steps as mmengine counts them: the warm-up
    factor rises linearly from ``warmup_start`` at step 0 to 1 at step ``warmup_steps - 1``; then
    ``(base - min_lr) * (1 - t / (T - 1)) ** power + min_lr``, ``t`` the steps since warm-up and ``T``
    the steps after it, so the last step runs at ``min_lr``."""
    if step < warmup_steps:
        return base * (warmup_start + (1.0 - warmup_start) * step / max(warmup_steps - 1, 1))
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps - 1, 1), 1.0)
    return (base - min_lr) * (1.0 - progress) ** power + min_lr
