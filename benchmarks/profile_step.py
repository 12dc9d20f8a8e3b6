"""Where a joint-MAE training step spends its time: a torch.profiler table of one step (after a warm-up
step), operators by self time, with the share that is matrix multiplication. Usage (repository root):

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/profile_step.py --backbone vit_small --img-size 224 --batch-size 8
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import profile

from codemae.batch import make_batch
from codemae.config import Config, ModelConfig
from codemae.methods import build_method
from codemae.train.optim import pretraining_optimizer
from codemae.train.step import TrainStep

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    torch.manual_seed(0)
    b, s = args.batch_size, args.img_size
    model = build_method(Config(model=ModelConfig(backbone=args.backbone, img_size=s, sar_channels=3)))
    step = TrainStep(model, pretraining_optimizer(model, 1e-4, 0.05, [0.9, 0.95]), torch.device("cpu"))
    batch = make_batch(torch.randn(b, 3, s, s), torch.randn(b, 3, s, s))

    def one_step() -> None:
        step.backward(step.forward(batch))
        step.clip()
        step.apply()

    one_step()
    with profile() as prof:
        one_step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    print(f"{args.backbone} joint MAE, {s} px, {b} pairs, {torch.get_num_threads()} thread(s): one step "
          f"{total / 1e6:.2f} s of operator self time, {matmul / total:.1%} of it in matmuls ({', '.join(MATMUL_OPS)})")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
