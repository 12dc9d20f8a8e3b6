"""``codemae bench``: training throughput, step-time split, memory, data-pipeline speed and FLOP/s utilisation.

Each backbone is measured in a fresh process (so peak memory is its own): joint-MAE
training steps fed by the real data pipeline (synthetic scenes through the paired
crop, ``workers`` loader processes), the step split into data wait / forward /
backward / optimiser, pairs per second, and the step's FLOPs (counted by
``torch.utils.flop_counter``) per second next to the FLOP/s of a large matmul on
the same device; their ratio is the utilisation figure. The data pipeline alone is
timed with 0, 1 and 2 workers: it has to outrun the model. On a GPU every backbone
is also measured in bf16 autocast, with CUDA peak memory.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from codemae.config import Config, DataConfig, MethodConfig, ModelConfig, SourceConfig, SyntheticConfig

PIPELINE_WORKERS = (0, 1, 2)


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 4096,
                       repeats: int = 10, clock=time.perf_counter) -> float:  # noqa: ANN001 (a clock function)
    """Best-of-``repeats`` GFLOP/s of an ``n x n`` matmul (2 n^3 FLOPs) on ``device`` in ``dtype``; per second
    of ``clock`` (wall time, or ``time.process_time``: per CPU-second of this process, on a CPU)."""
    n = n if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = clock()
        a @ b
        _sync(device)
        best = min(best, clock() - start)
    return 2 * n**3 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(backbone: str, img_size: int, batch: int, workers: int) -> Config:
    """Joint MAE on synthetic scenes (1.25x the input size, so the crop resamples), no statistics pass."""
    scenes = SyntheticConfig(num_scenes=64 * batch, image_size=int(img_size * 1.25))  # no epoch end while timing
    source = SourceConfig(name="synthetic", kind="synthetic", stats="none", synthetic=scenes)
    return Config(model=ModelConfig(backbone=backbone, img_size=img_size), method=MethodConfig(),
                  data=DataConfig(sources=[source], batch_size=batch, num_workers=workers))


def bench_loader(cfg: Config):
    """The real training loader of ``cfg`` (one process, no statistics written)."""
    from codemae.data.pipeline import build_training_data

    with tempfile.TemporaryDirectory() as tmp:
        return build_training_data(cfg.data, cfg.model.geometry, Path(tmp), 1, 0, write_stats=False)[0]


def endless(loader):
    while True:
        yield from loader


def measure_backbone(backbone: str, img_size: int, batch: int, steps: int, threads: int | None, workers: int,
                     precision: str, compiled: bool = False) -> dict:
    """Time ``steps`` joint-MAE training steps (after 2 warm-up steps) of ``backbone``, set up as the engine
    sets a run up (TF32 on CUDA, the fused AdamW, its blocks compiled when ``compiled``)."""
    from codemae.batch import model_input
    from codemae.methods import build_method
    from codemae.train.accel import compile_blocks, enable_tf32
    from codemae.train.optim import pretraining_optimizer
    from codemae.train.step import TrainStep

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = bench_config(backbone, img_size, batch, workers)
    loader = bench_loader(cfg)
    batches = endless(loader)

    def fetch() -> dict:
        return model_input(next(batches), device)[0]

    first = fetch()  # start the loader workers before torch's compute threads exist in this process
    torch.manual_seed(0)
    model = build_method(cfg).to(device)
    enable_tf32(device)
    step = TrainStep(model, pretraining_optimizer(model, 1e-4, 0.05, [0.9, 0.95]), device, precision)
    with FlopCounterMode(display=False) as counter:
        step.backward(step.forward(first))
    step.apply(update=False)
    step_flops = counter.get_total_flops()  # counted eagerly: compiling changes no FLOP
    compiled = compiled and compile_blocks(model, device)
    for _ in range(2 if compiled else 0):  # compiling (forward and backward graphs) is over before timing
        step.backward(step.forward(first))
        step.apply(update=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimizer": []}
    cpu_s = []
    for i in range(steps + 2):
        c0 = time.process_time()
        t0 = time.perf_counter()
        data = fetch()
        _sync(device)
        t1 = time.perf_counter()
        terms = step.forward(data)
        _sync(device)
        t2 = time.perf_counter()
        step.backward(terms)
        _sync(device)
        t3 = time.perf_counter()
        step.clip()
        step.apply()
        _sync(device)
        t4 = time.perf_counter()
        if i >= 2:
            cpu_s.append(time.process_time() - c0)
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[key].append(value)
    batches.close()
    step_s = [sum(parts) for parts in zip(*times.values())]
    mean_step = statistics.mean(step_s)
    peak = matmul_peak_gflops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    result = {
        "backbone": backbone, "img_size": img_size, "batch_pairs": batch, "precision": precision, "compiled": compiled,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "step_s": round(mean_step, 4),
        "step_s_std": round(statistics.stdev(step_s), 4) if len(step_s) > 1 else 0.0,
        **{f"{k}_s": round(statistics.mean(v), 4) for k, v in times.items()},
        "pairs_per_s": round(batch / mean_step, 2),
        "step_gflop": round(step_flops / 1e9, 2),
        "achieved_gflops": round(step_flops / mean_step / 1e9, 2),
        "matmul_peak_gflops": round(peak, 2),  # measured in this process, right after the steps
        "utilisation": round(step_flops / mean_step / 1e9 / peak, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device.type == "cpu":  # the same ratio per CPU-second: unaffected by other processes sharing the cores
        cpu_peak = matmul_peak_gflops(device, clock=time.process_time)
        result |= {"step_cpu_s": round(statistics.mean(cpu_s), 4),
                   "utilisation_cpu_time": round(step_flops / statistics.mean(cpu_s) / 1e9 / cpu_peak, 3)}
    if device.type == "cuda":
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def measure_pipeline(img_size: int, batch: int, workers: int, batches: int = 8) -> float:
    """Pairs per second of the data pipeline alone (after its first batch, i.e. worker start-up)."""
    stream = endless(bench_loader(bench_config("vit_tiny", img_size, batch, workers)))
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - start
    stream.close()  # shut the workers down before the process exits
    return round(batches * batch / seconds, 2)


def _child(queue: mp.Queue, function, *args) -> None:
    queue.put(function(*args))
    queue.close()
    queue.join_thread()
    os._exit(0)  # the result is sent: skip interpreter teardown


def in_fresh_process(function, *args):
    """Run ``function(*args)`` in a fresh child forked from a clean fork server (never from this
    process, whose compute threads would not survive a fork) and return its result; the child's peak
    memory is its own."""
    ctx = mp.get_context("forkserver")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, function, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


STEP_COLUMNS = ("backbone", "precision", "compiled", "params_m", "pairs_per_s", "step_s", "data_s", "forward_s",
                "backward_s", "optimizer_s", "step_gflop", "achieved_gflops", "matmul_peak_gflops", "utilisation",
                "step_cpu_s", "utilisation_cpu_time", "peak_rss_mb", "cuda_peak_mb")


def run_bench(backbones: list[str], img_size: int, batch: int, steps: int, threads: int | None,
              out: str | None, workers: int = 2, compiled: bool = False) -> dict:
    """Measure each backbone (fp32, and bf16 on a GPU) and the data pipeline; print tables, optionally JSON."""
    if threads:
        torch.set_num_threads(threads)
    precisions = ["fp32", "bf16"] if torch.cuda.is_available() else ["fp32"]
    steps_table = [in_fresh_process(measure_backbone, backbone, img_size, batch, steps, threads, workers, precision,
                                    compiled)
                   for backbone in backbones for precision in precisions]
    pipeline = {w: in_fresh_process(measure_pipeline, img_size, batch, w) for w in PIPELINE_WORKERS}
    print(f"joint MAE training step, {img_size} px, batch {batch} pairs, {workers} loader workers, "
          f"{steps_table[0]['device']}; utilisation = achieved / matmul peak of the same process")
    print(" | ".join(STEP_COLUMNS))
    for r in steps_table:
        print(" | ".join(str(r.get(k, "-")) for k in STEP_COLUMNS))
    fastest = max(r["pairs_per_s"] for r in steps_table)
    print(f"data pipeline alone (synthetic scenes -> paired crop, {img_size} px): "
          + ", ".join(f"{w} workers {v} pairs/s" for w, v in pipeline.items())
          + f"; fastest model above {fastest} pairs/s")
    result = {"steps": steps_table, "pipeline_pairs_per_s": pipeline}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
