"""Device-side speed settings of a training run: the precision a device gets by default, TF32 matmuls,
torch.compile of the transformer blocks (with a one-line reason where it cannot), the bf16 teacher."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace

import torch
from torch import nn

from codemae.config import Config
from codemae.models.attention import Block, CrossAttentionResidual

log = logging.getLogger("codemae")
COMPILED = (Block, CrossAttentionResidual)  # every attention / MLP block of every backbone, decoder and method


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on CUDA, fp32 elsewhere (a CPU without bf16 hardware runs bf16 slower)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


def with_device_precision(cfg: Config, device: torch.device) -> Config:
    """``cfg`` with ``train.precision: auto`` resolved for ``device`` (other values unchanged)."""
    return replace(cfg, train=replace(cfg.train, precision=resolve_precision(cfg.train.precision, device)))


def enable_tf32(device: torch.device) -> None:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (the fp32 parts of a bf16 run too)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compile_unavailable(device: torch.device) -> str:
    """Why torch.compile cannot run on ``device`` here ('' when it can)."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile is not supported on this Python / platform (torch {torch.__version__})"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return "" if has_triton() else "triton is not installed (pip install triton)"
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "c++")
        found = any(shutil.which(c) for c in (compiler, "g++", "clang++"))
        return "" if found else f"no C++ compiler found ({compiler}, g++, clang++) for inductor's CPU kernels"
    return f"no inductor backend for device {device.type}"


def compile_blocks(method: nn.Module, device: torch.device) -> bool:
    """Compile every transformer block of ``method`` in place (``nn.Module.compile``: parameter names and the
    state dict are unchanged). Masking stays eager and compiled blocks draw eager random numbers
    (inductor's ``fallback_random``), so a compiled step computes the eager step's math. Where compiling
    is not possible, log the reason in one line and return False (the run goes on eagerly)."""
    reason = compile_unavailable(device)
    if reason:
        log.warning("train.compile: running eagerly, %s", reason)
        return False
    import torch._inductor.config as inductor

    inductor.fallback_random = True
    blocks = [m for m in method.modules() if isinstance(m, COMPILED)]
    for block in blocks:
        block.compile()
    log.info("train.compile: %d transformer blocks compiled for %s", len(blocks), device.type)
    return True


def teacher_in_bf16(method: nn.Module, precision: str, device: torch.device) -> bool:
    """On CUDA in bf16, hold the method's live frozen teacher (if any) in bf16: half its memory, no per-call
    weight casts under autocast; it runs without gradient either way. Returns whether it was cast."""
    teachers = getattr(method, "_teacher", None)
    if not teachers or precision != "bf16" or device.type != "cuda":
        return False
    teachers[0].to(torch.bfloat16)
    return True
