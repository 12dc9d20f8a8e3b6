"""Sliding-window inference: predict overlapping windows of a large image and stitch them.

One function serves segmentation, damage assessment and scene embedding: the
caller's ``predict`` maps a batch of windows (one tensor per input image, e.g.
optical and SAR) to a batch of outputs at ``1 / out_stride`` of the window size
(1 for per-pixel logits, the patch size for patch-grid features). Overlapping
outputs are averaged, so a model whose output at a pixel depends only on that
pixel gives exactly its whole-image prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets that cover ``[0, size)`` with windows of ``window`` at ``stride``, the last flush
    with the end (one window at 0 when the image is not larger than the window)."""
    if window <= 0 or stride <= 0:
        raise ValueError(f"window {window} and stride {stride} must be positive")
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


@torch.no_grad()
def sliding_window(predict: Callable[[list[Tensor]], Tensor], images: Sequence[Tensor], window: int,
                   stride: int, out_stride: int = 1, batch_size: int = 8, progress: bool = False) -> Tensor:
    """Stitched ``(K, H // out_stride, W // out_stride)`` output of ``predict`` over windows of ``images``.

    ``images`` are ``(C_i, H, W)`` tensors of one size; each window is cut at the same place in all of
    them and ``predict`` gets the list of ``(B, C_i, window, window)`` batches. Images smaller than the
    window are zero-padded at the bottom/right and the output cropped back. ``window`` and ``stride``
    must be multiples of ``out_stride``.
    """
    if not images:
        raise ValueError("sliding_window needs at least one image")
    height, width = images[0].shape[-2:]
    if any(im.shape[-2:] != (height, width) for im in images):
        raise ValueError(f"images of different sizes: {[tuple(im.shape[-2:]) for im in images]}")
    if window % out_stride or stride % out_stride:
        raise ValueError(f"window {window} and stride {stride} must be multiples of out_stride {out_stride}")
    pad_h, pad_w = max(0, window - height), max(0, window - width)
    padded = [F.pad(im, (0, pad_w, 0, pad_h)) for im in images]
    full_h, full_w = height + pad_h, width + pad_w
    boxes = [(y, x) for y in window_starts(full_h, window, stride) for x in window_starts(full_w, window, stride)]
    total: Tensor | None = None
    count = torch.zeros(1, full_h // out_stride, full_w // out_stride, device=images[0].device)
    win = window // out_stride
    for first in tqdm(range(0, len(boxes), batch_size), desc="windows", disable=not progress, leave=False):
        chunk = boxes[first:first + batch_size]
        crops = [torch.stack([im[:, y:y + window, x:x + window] for y, x in chunk]) for im in padded]
        out = predict(crops)
        if out.shape[-2:] != (win, win):
            raise ValueError(f"predict returned {tuple(out.shape[-2:])} per window, expected {(win, win)}")
        if total is None:
            total = torch.zeros(out.shape[1], full_h // out_stride, full_w // out_stride,
                                dtype=out.dtype, device=out.device)
        for o, (y, x) in zip(out, chunk):
            ys, xs = y // out_stride, x // out_stride
            total[:, ys:ys + win, xs:xs + win] += o
            count[:, ys:ys + win, xs:xs + win] += 1
    assert total is not None
    return (total / count.to(total))[:, :height // out_stride, :width // out_stride]
