"""Semantic segmentation with a light UperNet-style head on the encoder's feature pyramid.

The pyramid levels (stride 16, 8, 4 for HiViT + iTPN; one stride-16 level for a ViT)
become feature maps; a pyramid-pooling module (scales 1, 2, 3, 6) refines the
coarsest, an FPN adds the levels top-down, and the fused maps predict classes at
stride 4 (or 16), upsampled to the input. The encoder is frozen or fine-tuned; the
input is one modality or both (per-level features concatenated). mIoU ignores the
no-data label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_jaccard_index

from codemae.config import ScalingConfig, SourceConfig, SyntheticConfig
from codemae.data.readers import read_image, unit_array
from codemae.data.sources import FolderSource
from codemae.data.synthetic import CLASSES, generate_scene
from codemae.eval.data import mask_files, read_mask
from codemae.eval.features import MODALITY_SETS
from codemae.eval.report import summarise
from codemae.methods import PretrainMethod

POOL_SCALES = (1, 2, 3, 6)
IGNORE = 255


def level_maps(levels: list[Tensor], grids: list[int], grid: int) -> list[Tensor]:
    """(B, N, s*s*C) pyramid levels -> (B, C, grid*s, grid*s) maps (sub-tokens in row-major order)."""
    maps = []
    for level, s in zip(levels, grids):
        b = level.shape[0]
        x = level.reshape(b, grid, grid, s, s, -1).permute(0, 5, 1, 3, 2, 4)
        maps.append(x.reshape(b, -1, grid * s, grid * s))
    return maps


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class UperHead(nn.Module):
    def __init__(self, in_dims: list[int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        top = in_dims[0]  # coarsest level first
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(top, width, 1)) for s in POOL_SCALES)
        self.ppm_out = conv_bn_relu(top + width * len(POOL_SCALES), width, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(d, width, 1) for d in in_dims[1:])
        self.smooth = nn.ModuleList(conv_bn_relu(width, width, 3) for _ in in_dims[1:])
        self.fuse = conv_bn_relu(width * len(in_dims), width, 3)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, maps: list[Tensor]) -> Tensor:
        top = maps[0]
        pooled = [F.interpolate(p(top), size=top.shape[-2:], mode="bilinear", align_corners=False) for p in self.ppm]
        path = [self.ppm_out(torch.cat([top, *pooled], 1))]
        for x, lateral in zip(maps[1:], self.lateral):
            path.append(lateral(x) + F.interpolate(path[-1], size=x.shape[-2:], mode="bilinear", align_corners=False))
        outs = [path[0]] + [smooth(p) for p, smooth in zip(path[1:], self.smooth)]
        size = outs[-1].shape[-2:]
        fused = self.fuse(torch.cat([F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs], 1))
        return self.classifier(fused)


class Segmenter(nn.Module):
    def __init__(self, method: PretrainMethod, modalities: tuple[str, ...], num_classes: int,
                 train_encoder: bool) -> None:
        super().__init__()
        self.method, self.modalities, self.train_encoder = method, modalities, train_encoder
        encoder = method.encoder
        dims = [d // (s * s) * len(modalities) for d, s in zip(encoder.level_dims, encoder.level_grids)]
        self.head = UperHead(dims, num_classes)
        method.requires_grad_(train_encoder)

    def forward(self, images: dict[str, Tensor]) -> Tensor:
        encoder = self.method.encoder
        with torch.set_grad_enabled(self.train_encoder and self.training):
            out = self.method.encode_outputs({m: images[m] for m in self.modalities})
        grid = next(iter(images.values())).shape[-1] // encoder.patch_size
        per_mod = [level_maps(out[m].levels, encoder.level_grids, grid) for m in self.modalities]
        maps = [torch.cat(levels, 1) for levels in zip(*per_mod)]
        logits = self.head(maps)
        return F.interpolate(logits, size=next(iter(images.values())).shape[-2:], mode="bilinear", align_corners=False)


@dataclass
class SegmentationData:
    """Tiles: per-modality normalised images (N, C, S, S) and label maps (N, S, S) with ``ignore`` for no data."""

    images: dict[str, Tensor]
    masks: Tensor
    classes: list[str]
    num_classes: int
    ignore: int = IGNORE


def normalise(x: Tensor) -> Tensor:
    """Per-channel standardisation over the given tiles (downstream computes its own statistics)."""
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


def synthetic_segmentation(n: int, size: int, seed: int, channels: dict[str, int]) -> SegmentationData:
    cfg = SyntheticConfig(image_size=size)
    scenes = [generate_scene(seed + i, cfg) for i in range(n)]
    opt = torch.from_numpy(np.stack([s.optical for s in scenes])).permute(0, 3, 1, 2)
    sar = torch.from_numpy(np.stack([s.sar for s in scenes])).permute(0, 3, 1, 2).repeat(1, channels["sar"], 1, 1)
    masks = torch.from_numpy(np.stack([s.labels for s in scenes]))
    return SegmentationData({"opt": normalise(opt), "sar": normalise(sar)}, masks, list(CLASSES), len(CLASSES))


def folder_segmentation(root: str, masks: str, size: int, channels: dict[str, int], nodata: int = -1
                        ) -> SegmentationData:
    """A paired folder with a folder of label rasters (same stems), each pair resized to ``size``
    (labels by nearest neighbour); ``nodata`` labels are ignored."""
    source = FolderSource(SourceConfig(kind="paired", root=root), channels)
    arrays = [source.load(i) for i in range(len(source))]
    images = {
        m: normalise(torch.cat([F.interpolate(torch.from_numpy(a[m]).permute(2, 0, 1)[None], size=(size, size),
                                              mode="bicubic", align_corners=False, antialias=True) for a in arrays]))
        for m in ("opt", "sar")
    }
    maps = torch.stack([F.interpolate(torch.from_numpy(read_mask(p))[None, None].float(), size=(size, size),
                                      mode="nearest")[0, 0].long() for p in mask_files(source, masks)])
    maps[maps == nodata] = IGNORE
    labels = sorted(set(maps.unique().tolist()) - {IGNORE})
    return SegmentationData(images, maps, [str(c) for c in labels], max(labels) + 1)


def scene_tiles(files: dict[str, str], mask_file: str, tile: int, channels: dict[str, int],
                bands: dict[str, list[int]], scaling: dict[str, ScalingConfig], nodata: int = -1) -> SegmentationData:
    """Cut one co-registered scene (``files[m]`` per modality) and its label raster into
    ``tile``-pixel tiles. Bands are picked by index before scaling; ``nodata`` labels and
    non-finite pixels are ignored in training and scoring."""
    mask = read_mask(Path(mask_file))
    images = {}
    for m, path in files.items():
        raw = read_image(path)
        finite = np.isfinite(raw).all(axis=2)
        mask[~finite] = nodata  # real rasters carry NaN where there is no data: those pixels are ignored
        raw = np.where(np.isfinite(raw), raw, 0).astype(raw.dtype) if not finite.all() else raw
        unit = unit_array(raw, scaling[m], channels[m], path, f"model.{m}_channels", bands.get(m))
        images[m] = torch.from_numpy(unit).permute(2, 0, 1)
    mask[mask == nodata] = IGNORE
    h, w = mask.shape
    corners = [(y, x) for y in range(0, h - tile + 1, tile) for x in range(0, w - tile + 1, tile)]
    stack = lambda a: torch.stack([a[..., y : y + tile, x : x + tile] for y, x in corners])  # noqa: E731
    labels = sorted(set(np.unique(mask).tolist()) - {IGNORE})
    return SegmentationData({m: normalise(stack(a)) for m, a in images.items()}, stack(torch.from_numpy(mask)),
                            [str(c) for c in labels], max(labels) + 1)


def train_segmenter(model: Segmenter, data: SegmentationData, train_idx: np.ndarray, test_idx: np.ndarray,
                    epochs: int, seed: int, lr: float = 1e-3, batch: int = 8) -> float:
    """AdamW on the head (and the encoder at lr/10 when fine-tuned); mIoU (%) on the test tiles."""
    torch.manual_seed(seed)
    groups = [{"params": model.head.parameters(), "lr": lr}]
    if model.train_encoder:
        groups.append({"params": model.method.parameters(), "lr": lr / 10})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    for _ in range(epochs):
        model.train()
        order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx))]
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            if len(idx) < 2:
                continue
            logits = model({m: x[idx] for m, x in data.images.items()})
            loss = F.cross_entropy(logits, data.masks[idx], ignore_index=data.ignore)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        test = torch.from_numpy(test_idx)
        pred = model({m: x[test] for m, x in data.images.items()}).argmax(1)
    return miou(pred, data.masks[test], data.num_classes, data.ignore)


def miou(pred: Tensor, target: Tensor, num_classes: int, ignore: int) -> float:
    """Dataset-level mean IoU (%) over the classes present in prediction or target; ``ignore`` pixels skipped."""
    return 100 * multiclass_jaccard_index(pred, target, num_classes, average="macro", ignore_index=ignore).item()


def run_segmentation(load, data: SegmentationData, modality: str, train_encoder: bool, epochs: int,
                     seeds: list[int], train_fraction: float) -> dict:
    """Train a head (and optionally the encoder) per seed; the first ``train_fraction`` of the
    tiles train it (for a tiled scene: the top part, spatially apart from the test part)."""
    cut = int(round(train_fraction * len(data.masks)))
    train_idx, test_idx = np.arange(cut), np.arange(cut, len(data.masks))
    per_seed = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = Segmenter(load(), MODALITY_SETS[modality], data.num_classes, train_encoder)
        per_seed.append({"mIoU": train_segmenter(model, data, train_idx, test_idx, epochs, seed)})
    return {"summary": summarise(per_seed), "train_tiles": len(train_idx), "test_tiles": len(test_idx),
            "classes": data.classes}
