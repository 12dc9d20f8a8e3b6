"""Where evaluation runs: the ``--device`` choice, and bf16 autocast for frozen feature extraction."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from codemae.errors import ConfigError


def resolve_device(name: str | None) -> torch.device:
    """``None`` (or ``auto``): the first CUDA device when one is available, else the CPU; ``cpu``,
    ``cuda`` or ``cuda:N``, refused with a one-line :class:`ConfigError` when the machine lacks it."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                              "use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for a module without any)."""
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for inference on a CUDA device that supports it; nothing elsewhere (a CPU without
    bf16 hardware runs it slower than fp32)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
