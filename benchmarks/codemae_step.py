"""Step time of CoDe-MAE vs joint MAE on the same backbone, with the OKD teacher live or cached.

The live teacher is a randomly initialised DINOv3 ViT-L/16 (the Hugging Face
``DINOv3ViTModel`` layout of ``dinov3-vitl16-pretrain-sat493m``: 1024-d, 24 layers,
4 registers): its cost, not its weights, is what is measured. Needs the
``teacher`` extra. Usage (from the repository root):

    python benchmarks/codemae_step.py --backbone hivit_base --img-size 224 --batch-size 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from codemae.config import Config, LossWeights, MethodConfig, ModelConfig, TeacherConfig
from codemae.batch import make_batch
from codemae.methods import build_method
from codemae.models.teacher import Teacher
from codemae.train.optim import pretraining_optimizer

SAT_L16 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
               patch_size=16, num_register_tokens=4, layerscale_value=1e-5, use_gated_mlp=False)


class RandomDinoV3L(Teacher):
    """DINOv3-Sat ViT-L/16 architecture with random weights (a cost model of the real teacher)."""

    def __init__(self) -> None:
        from transformers import DINOv3ViTConfig, DINOv3ViTModel

        super().__init__(TeacherConfig(dim=1024))
        self.model = DINOv3ViTModel(DINOv3ViTConfig(**SAT_L16))
        self.dim, self.patch_size = 1024, 16

    def patch_tokens(self, x):
        return self.model(pixel_values=x).last_hidden_state[:, 5:]


def time_steps(method, batch, steps: int) -> list[float]:
    optimizer = pretraining_optimizer(method, 1e-4, 0.05, [0.9, 0.95])
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        sum(method(batch).values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="hivit_base")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    b, s = args.batch_size, args.img_size
    model = ModelConfig(backbone=args.backbone, img_size=s, sar_channels=3)
    grid = s // 16
    batch = make_batch(torch.randn(b, 3, s, s), torch.randn(b, 3, s, s),
                       opt_mean=torch.full((b, 3), 0.4), opt_std=torch.full((b, 3), 0.2))
    full = MethodConfig(name="codemae", okd=True, ccl="cross_attention", cdr=True, weights=LossWeights())
    rows = {}
    mae = build_method(Config(model=model, method=MethodConfig()))
    rows["joint MAE"] = time_steps(mae, batch, args.steps)
    codemae = build_method(Config(model=model, method=full))
    cached = {**batch, "teacher_opt": torch.randn(b, grid * grid, 1024)}
    rows["CoDe-MAE, teacher cached"] = time_steps(codemae, cached, args.steps)
    codemae.attach_teacher(RandomDinoV3L().freeze())
    rows["CoDe-MAE, teacher live (ViT-L)"] = time_steps(codemae, batch, args.steps)
    base = statistics.mean(rows["joint MAE"])
    print(f"{args.backbone} at {s} px, batch {b} pairs, fp32, {torch.get_num_threads()} threads, "
          f"{args.steps} timed steps")
    print("| method | step s (mean +- std) | ratio to joint MAE |")
    print("|---|---|---|")
    for name, times in rows.items():
        mean = statistics.mean(times)
        std = statistics.stdev(times) if len(times) > 1 else 0.0
        print(f"| {name} | {mean:.2f} +- {std:.2f} | {mean / base:.2f} |")


if __name__ == "__main__":
    main()
