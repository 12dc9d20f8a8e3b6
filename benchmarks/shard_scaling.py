"""Loader memory and start-up against shard-set size: a 10k and a 100k-sample set, same everything else.

Each set is written with the same small PNG pair repeated (the loader's work per
sample does not depend on content), 1,000 samples per shard, with a real manifest.
Each measurement runs in a fresh process: build the ShardStream from the manifest
(plan included), then the first batch through a DataLoader; reported are the
seconds to the first batch and the process's peak RSS. Usage (repository root):

    python benchmarks/shard_scaling.py --sizes 10000 100000 --workdir /tmp/codemae_shards
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import multiprocessing as mp
import resource
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from codemae.config import SourceConfig, to_dict
from codemae.data.shards import FORMAT, MANIFEST, Shard, sha256

PER_SHARD = 1000


def png(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_set(root: Path, samples: int) -> None:
    """``samples`` pairs of 64 px in shards of PER_SHARD, and their manifest."""
    if (root / MANIFEST).is_file():
        return
    (root / "pairs").mkdir(parents=True, exist_ok=True)
    members = {"opt.png": png((64, 64, 3)), "sar.png": png((64, 64))}
    shards = []
    for start in range(0, samples, PER_SHARD):
        path = root / "pairs" / f"shard-{start // PER_SHARD:06d}.tar"
        count = min(PER_SHARD, samples - start)
        with tarfile.open(path, "w") as tar:
            for i in range(start, start + count):
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(dataclasses.asdict(Shard(str(path.relative_to(root)), count, path.stat().st_size, sha256(path))))
    source = {"name": "pairs", "kind": "paired", "modalities": ["opt", "sar"], "samples": samples,
              "source": to_dict(SourceConfig(name="pairs")), "shards": shards,
              "stats": {m: {"mean": [0.5], "std": [0.25]} for m in ("opt", "sar")}}
    (root / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": 1, "sources": [source]}))


def first_batch(root: str, workers: int, queue: mp.Queue) -> None:
    from torch.utils.data import DataLoader

    from codemae.config import load_config
    from codemae.data.shards import ShardStream, shard_sources

    start = time.perf_counter()
    cfg = load_config(None, [f"data.sources=[{{layout: shards, root: {root}}}]", "data.batch_size=32",
                             f"data.num_workers={workers}", "model.img_size=64"])
    stream = ShardStream(*shard_sources(cfg.data), cfg.data, cfg.model.geometry, cfg.seed)
    planned = time.perf_counter()
    batches = iter(DataLoader(stream, batch_size=None, num_workers=workers))
    next(batches)
    del batches  # stop the workers before reporting
    done = time.perf_counter()
    queue.put({"plan_s": round(planned - start, 3), "first_batch_s": round(done - start, 3),
               "steps_per_epoch": len(stream),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--workdir", default="/tmp/codemae_shards")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print("samples | shards | set MB | plan s | first batch s | steps/epoch | peak RSS MB (loader process)")
    for size in args.sizes:
        root = Path(args.workdir) / f"set_{size}"
        write_set(root, size)
        queue = ctx.Queue()
        proc = ctx.Process(target=first_batch, args=(str(root), args.workers, queue))
        proc.start()
        r = queue.get()
        proc.join()
        mb = sum(p.stat().st_size for p in root.rglob("*.tar")) / 2**20
        print(f"{size} | {-(-size // PER_SHARD)} | {mb:.0f} | {r['plan_s']} | {r['first_batch_s']} | "
              f"{r['steps_per_epoch']} | {r['peak_rss_mb']}")


if __name__ == "__main__":
    main()
