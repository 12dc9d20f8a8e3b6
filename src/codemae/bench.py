"""``codemae bench``: training-step speed, memory and FLOP/s utilisation of the joint MAE.

Each backbone is measured in a fresh process (so peak RSS is its own) on random
data: step time split into forward / backward / optimiser, pairs per second, and
the step's FLOPs (counted by ``torch.utils.flop_counter``) per second next to the
FLOP/s of a large float32 matmul on the same machine; their ratio is the
utilisation figure.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from codemae.config import Config, MethodConfig, ModelConfig
from codemae.methods import build_method
from codemae.train.optim import build_optimizer


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best-of-``repeats`` GFLOP/s of an ``n x n`` float32 matmul (2 n^3 FLOPs)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_backbone(backbone: str, img_size: int, batch: int, steps: int, threads: int | None) -> dict:
    """Time ``steps`` joint-MAE training steps (after 2 warm-up steps) of ``backbone``."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(backbone=backbone, img_size=img_size), method=MethodConfig())
    model = build_method(cfg)
    optimizer = build_optimizer(model, 1e-4, 0.05, [0.9, 0.95])
    batch_dict = {"opt": torch.randn(batch, 3, img_size, img_size),
                  "sar": torch.randn(batch, 1, img_size, img_size), "paired": True}
    with FlopCounterMode(display=False) as counter:
        sum(model(batch_dict).values()).backward()
    optimizer.zero_grad(set_to_none=True)
    step_flops = counter.get_total_flops()
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = sum(model(batch_dict).values())
        _sync()
        t1 = time.perf_counter()
        loss.backward()
        _sync()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        t3 = time.perf_counter()
        if i >= 2:
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(value)
    step = [sum(parts) for parts in zip(*times.values())]
    mean_step = statistics.mean(step)
    return {
        "backbone": backbone,
        "img_size": img_size,
        "batch_pairs": batch,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "step_s": round(mean_step, 4),
        "step_s_std": round(statistics.stdev(step), 4) if len(step) > 1 else 0.0,
        **{f"{k}_s": round(statistics.mean(v), 4) for k, v in times.items()},
        "pairs_per_s": round(batch / mean_step, 2),
        "step_gflop": round(step_flops / 1e9, 2),
        "achieved_gflops": round(step_flops / mean_step / 1e9, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
    }


def _child(queue: mp.Queue, *args) -> None:
    queue.put(measure_backbone(*args))


def run_bench(backbones: list[str], img_size: int, batch: int, steps: int, threads: int | None,
              out: str | None) -> list[dict]:
    """Measure each backbone in its own process, print a table, optionally write JSON."""
    if threads:
        torch.set_num_threads(threads)
    peak = round(matmul_peak_gflops(), 2)
    ctx = mp.get_context("spawn")
    results = []
    for backbone in backbones:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(queue, backbone, img_size, batch, steps, threads))
        proc.start()
        result = queue.get()
        proc.join()
        result["matmul_peak_gflops"] = peak
        result["utilisation"] = round(result["achieved_gflops"] / peak, 3)
        results.append(result)
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"joint MAE training step, {img_size} px, batch {batch} pairs, fp32, {device}; "
          f"float32 matmul peak {peak} GFLOP/s")
    header = ("backbone", "params_m", "pairs_per_s", "step_s", "forward_s", "backward_s", "optimizer_s",
              "step_gflop", "achieved_gflops", "utilisation", "peak_rss_mb")
    print(" | ".join(header))
    for r in results:
        print(" | ".join(str(r[k]) for k in header))
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
    return results
