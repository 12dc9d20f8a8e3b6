"""CPU time of one AdamW step over the equal-work joint MAE's parameters (ViT-Tiny/16 + 8 x 512 decoder,
31.4 M) with torch's per-parameter loop (its CPU default, what the official MAE runs), foreach, and the
fused kernel codemae uses. Usage (repository root):

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/adamw_step.py
"""

from __future__ import annotations

import statistics
import time

import torch

from codemae.bench_official import EqualWork, codemae_model
from codemae.train.optim import param_groups

KINDS = {"loop (torch's CPU default)": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main(steps: int = 5, repeats: int = 2) -> None:
    model = codemae_model(EqualWork())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(repeats):  # interleaved, so drift hits every kind
        for kind, options in KINDS.items():
            optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), **options)
            optimizer.step()  # creates the state
            for _ in range(steps):
                start = time.process_time()
                optimizer.step()
                times[kind].append(time.process_time() - start)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"AdamW step over {params:.1f} M parameters, {torch.get_num_threads()} thread(s), CPU ms (median of "
          f"{steps * repeats})")
    for kind, values in times.items():
        print(f"{kind}: {1000 * statistics.median(values):.0f}")


if __name__ == "__main__":
    main()
