"""How close cached teacher features, resampled to a random crop, are to the teacher run on the crop.

For each image of a folder source: one RandomResizedCrop box (scale 0.2-1), then
(a) the teacher on the crop resized to ``--size`` and (b) the teacher on the whole
image resized to ``--size``, resampled to the crop box with the cache's RoIAlign.
Prints the mean per-token cosine similarity of (a) and (b) as OKD targets
(parameter-free layer norm, dataset-mean token removed), next to two
references: (b) without resampling (the whole image's features used as if they
were the crop's), and (a) against the features of a different image. Also the
time per image of reading + resampling the cache vs running the teacher.

    python benchmarks/teacher_cache_fidelity.py --checkpoint runs/mae_hivit_tiny_s1s2/checkpoints/last.pt \
        --root ../shared/data/s1s2_pairs --split val
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from codemae.config import SourceConfig, TeacherConfig
from codemae.data.sources import FolderSource
from codemae.data.teacher_cache import roi_align
from codemae.data.transforms import CropBox, crop_box
from codemae.loading import CheckpointTeacher
from codemae.models.teacher import to_student_grid


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a codemae checkpoint: its optical encoder is the teacher")
    parser.add_argument("--root", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--size", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    teacher = CheckpointTeacher(TeacherConfig(kind="checkpoint", path=args.checkpoint,
                                              mean=[0.0] * 3, std=[1.0] * 3)).freeze()
    source = FolderSource(SourceConfig(kind="opt", root=f"{args.root}/opt", split=args.split,
                                       split_csv=f"{args.root}/tiles.csv"), {"opt": 3, "sar": 1})
    generator = torch.Generator().manual_seed(0)
    print(f"teacher: optical encoder of {args.checkpoint}; {min(args.images, len(source))} images of {args.root}")
    print("| size | grid | cos(cached+RoIAlign, on crop) | cos(whole image, on crop) | cos(other image, on crop) "
          "| cache read+resample ms/img | teacher on crop ms/img |")
    print("|---|---|---|---|---|---|---|")
    for size in args.size:
        grid = size // teacher.patch_size
        pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"cached": [], "whole": [], "other": []}
        t_cache, t_live = [], []
        previous = None
        for i in range(min(args.images, len(source))):
            image = torch.from_numpy(source.load(i)["opt"]).permute(2, 0, 1)
            h, w = image.shape[1:]
            top, left, bh, bw = crop_box(h, w, (0.2, 1.0), (3 / 4, 4 / 3), generator)
            box = CropBox(top, left, bh, bw, False, (h, w))
            start = time.perf_counter()
            on_crop = to_student_grid(teacher(resize(image[:, top : top + bh, left : left + bw], size)), grid)[0]
            t_live.append(time.perf_counter() - start)
            whole = teacher(resize(image, size))[0].half()  # what the cache stores
            start = time.perf_counter()
            cached = roi_align(whole, box, grid)
            t_cache.append(time.perf_counter() - start)
            pairs["cached"].append((cached, on_crop))
            pairs["whole"].append((whole.float().flatten(1).T, on_crop))
            if previous is not None:
                pairs["other"].append((previous, on_crop))
            previous = on_crop
        # Compare OKD targets (parameter-free LN over channels) with the dataset-mean token removed:
        # raw features of an MAE encoder share one dominant direction, which makes any two look alike.
        target = lambda x: F.layer_norm(x, x.shape[-1:])  # noqa: E731
        centre = torch.cat([target(b) for _, b in pairs["cached"]]).mean(0)
        cos = {k: [F.cosine_similarity(target(a) - centre, target(b) - centre, dim=-1).mean().item() for a, b in v]
               for k, v in pairs.items()}
        fmt = lambda v: f"{statistics.mean(v):.3f} +- {statistics.stdev(v):.3f}"  # noqa: E731
        print(f"| {size} | {grid}x{grid} | {fmt(cos['cached'])} | {fmt(cos['whole'])} | {fmt(cos['other'])} "
              f"| {1000 * statistics.mean(t_cache):.2f} | {1000 * statistics.mean(t_live):.2f} |")

if __name__ == "__main__":
    main()
