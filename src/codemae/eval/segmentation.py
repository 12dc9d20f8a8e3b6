"""Semantic segmentation on the encoder's feature pyramid, with the papers' LoveDA recipe.

Heads (see :mod:`codemae.eval.seg_heads`): ``upernet``, mmseg's UPerHead on four levels (HiViT +
iTPN: strides 4, 8, 16 and a stride-32 level max-pooled from stride 16, as the published backbone
gives it; a ViT or a pyramid-less HiViT: BEiT's simple feature pyramid from its stride-16 map),
optionally with mmseg's auxiliary FCN head on the stride-16 level; ``light``, the earlier 64-channel
head on the pyramid levels as they come.

Recipe (:class:`Recipe`, defaults as the authors' LoveDA config): AdamW (wd 0.05), lr 3e-5 with
layer-wise decay 0.85 over the encoder's layer ids, drop path 0.15, linear warm-up then poly decay
per iteration, random crops with horizontal flips for training, sliding windows (stride half the
crop) for testing. Normalisation statistics come from the training images only. mIoU is
dataset-level over the test images and ignores the no-data label.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_confusion_matrix
from tqdm import tqdm

from codemae.config import ScalingConfig, SourceConfig, SyntheticConfig
from codemae.data.readers import read_raster, unit_array, valid_pixels
from codemae.data.sources import FolderSource
from codemae.data.stats import image_channel_stats
from codemae.data.synthetic import generate_scene
from codemae.errors import ConfigError, DataError
from codemae.eval.data import mask_files, read_mask
from codemae.eval.device import module_device
from codemae.eval.features import MODALITY_SETS
from codemae.eval.finetune import layer_decay_groups
from codemae.eval.report import summarise
from codemae.eval.seg_heads import FCNHead, LightHead, SimplePyramid, UPerHead
from codemae.eval.sliding_window import sliding_window
from codemae.eval.split_lists import read_split_list
from codemae.eval.splits import check_disjoint, list_indices
from codemae.methods import PretrainMethod
from codemae.train.optim import poly_lr_at

IGNORE = 255
HEADS = ("upernet", "light")
HEAD_CHANNELS = {"upernet": 512, "light": 64}
AUX_CHANNELS = 256
SCENE_SPLIT = {"train": np.array([0]), "test": np.array([1])}  # the two regions of scene_regions


@dataclass(frozen=True)
class Recipe:
    """Training and testing settings; the defaults are the authors' LoveDA run (mmseg config
    ``codemae_loveda_ld085_dp015``: 10k iterations, batch 8 x 2, 500 warm-up iterations)."""

    head: str = "upernet"
    channels: int | None = None  # head width (None: 512 for upernet, 64 for light)
    aux_head: bool = False
    aux_weight: float = 0.4
    train_encoder: bool = False
    lr: float = 3e-5
    layer_decay: float = 0.85
    weight_decay: float = 0.05
    drop_path: float = 0.15
    iters: int = 10_000
    warmup_iters: int = 500
    power: float = 1.0
    min_lr: float = 0.0
    batch_size: int = 16
    crop: int = 512
    stride: int | None = None  # sliding-window stride (None: half the crop)
    clip_grad: float = 35.0

    def __post_init__(self) -> None:
        checks = [(self.head in HEADS, "head", f"one of {', '.join(HEADS)}"),
                  (0 < self.layer_decay <= 1, "layer-decay", "in (0, 1]"),
                  (0 <= self.drop_path < 1, "drop-path", "in [0, 1)"),
                  (self.weight_decay >= 0, "weight-decay", ">= 0"),
                  (0 <= self.min_lr <= self.lr, "min-lr", f"in [0, lr {self.lr}]"),
                  (self.warmup_iters < self.iters, "warmup-iters", f"below --iters {self.iters}"),
                  (self.stride is None or self.stride <= self.crop, "stride", f"at most --crop {self.crop} "
                   "(a larger stride leaves pixels no window covers)"),
                  (self.batch_size >= 2, "batch-size", ">= 2 (the heads' BatchNorm needs two crops)")]
        for ok, flag, expected in checks:
            if not ok:
                raise ConfigError(f"--{flag} {getattr(self, flag.replace('-', '_'))}: expected {expected}")


def level_maps(levels: list[Tensor], grids: list[int], grid: int) -> list[Tensor]:
    """(B, N, s*s*C) pyramid levels -> (B, C, grid*s, grid*s) maps (sub-tokens in row-major order)."""
    maps = []
    for level, s in zip(levels, grids):
        b = level.shape[0]
        x = level.reshape(b, grid, grid, s, s, -1).permute(0, 5, 1, 3, 2, 4)
        maps.append(x.reshape(b, -1, grid * s, grid * s))
    return maps


class Segmenter(nn.Module):
    """Encoder (frozen or trained) -> per-level maps (modalities concatenated) -> head; logits at the
    input size. A frozen encoder stays in eval mode (no drop path, no dropout) while the head trains."""

    def __init__(self, method: PretrainMethod, modalities: tuple[str, ...], num_classes: int,
                 train_encoder: bool, head: str = "light", channels: int | None = None,
                 aux_head: bool = False) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head {head!r}: expected one of {', '.join(HEADS)}")
        self.method, self.modalities, self.train_encoder, self.kind = method, modalities, train_encoder, head
        encoder = method.encoder
        dims = [d // (s * s) * len(modalities) for d, s in zip(encoder.level_dims, encoder.level_grids)]
        width = channels or HEAD_CHANNELS[head]
        self.neck = SimplePyramid(dims[0]) if head == "upernet" and len(dims) == 1 else None
        if head == "light":
            self.head: nn.Module = LightHead(dims, num_classes, width)
        else:  # strides 4, 8, 16, 32
            self.head = UPerHead([dims[0]] * 4 if self.neck else [*dims[::-1], dims[0]], num_classes, width)
        aux_width = min(AUX_CHANNELS, max(width // 2, 1))  # mmseg's 256, narrower under narrow heads
        self.aux = FCNHead(dims[0], num_classes, aux_width) if aux_head else None  # stride-16 level
        method.requires_grad_(train_encoder)

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if not self.train_encoder:
            self.method.eval()
        return self

    def pyramid(self, images: dict[str, Tensor]) -> list[Tensor]:
        """The head's input maps: ``light`` coarsest first as the encoder gives them; ``upernet``
        finest first, strides 4, 8, 16, 32."""
        encoder = self.method.encoder
        with torch.set_grad_enabled(self.train_encoder and self.training and torch.is_grad_enabled()):
            out = self.method.encode_outputs({m: images[m] for m in self.modalities})
        grid = next(iter(images.values())).shape[-1] // encoder.patch_size
        per_mod = [level_maps(out[m].levels, encoder.level_grids, grid) for m in self.modalities]
        maps = [torch.cat(levels, 1) for levels in zip(*per_mod)]
        if self.kind == "light":
            return maps
        if self.neck is not None:
            return self.neck(maps[0])
        return [*maps[::-1], F.max_pool2d(maps[0], 2, 2, ceil_mode=True)]  # ceil: odd sizes keep a border

    def outputs(self, images: dict[str, Tensor], with_aux: bool = True) -> dict[str, Tensor]:
        """``main`` (and with the auxiliary head ``aux``) logits, bilinearly resized to the input."""
        size = next(iter(images.values())).shape[-2:]
        maps = self.pyramid(images)
        resize = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        out = {"main": resize(self.head(maps))}
        if self.aux is not None and with_aux:
            out["aux"] = resize(self.aux(maps[0] if self.kind == "light" else maps[2]))
        return out

    def forward(self, images: dict[str, Tensor]) -> Tensor:
        """Decode-head logits only (testing needs no auxiliary head)."""
        return self.outputs(images, with_aux=False)["main"]


@dataclass
class SegmentationData:
    """Images as unit-scaled ``(C, H, W)`` tensors per modality (not yet normalised), label maps
    ``(H, W)`` with ``ignore`` for no data, and the sample names that split lists refer to."""

    images: list[dict[str, Tensor]]
    masks: list[Tensor]
    names: list[str]
    classes: list[str]
    num_classes: int
    ignore: int = IGNORE


def labelled(images: list[dict[str, Tensor]], masks: list[Tensor], names: list[str]) -> SegmentationData:
    """The samples with their classes (the labels present, ``IGNORE`` aside); a negative label is refused."""
    labels = sorted(set(torch.cat([m.flatten() for m in masks]).unique().tolist()) - {IGNORE})
    if not labels:
        raise DataError("the label rasters hold no labelled pixel (all no data)")
    if labels[0] < 0:
        name = next(n for n, m in zip(names, masks) if bool((m == labels[0]).any()))
        raise DataError(f"the label raster of '{name}' holds label {labels[0]}: classes are 0 or more "
                        f"(--nodata {labels[0]} if it marks no data)")
    return SegmentationData(images, masks, names, [str(c) for c in labels], max(labels) + 1)


def synthetic_segmentation(n: int, size: int, seed: int, channels: dict[str, int]) -> SegmentationData:
    cfg = SyntheticConfig(image_size=size)
    scenes = [generate_scene(seed + i, cfg) for i in range(n)]
    images = [{"opt": torch.from_numpy(s.optical).permute(2, 0, 1).float(),
               "sar": torch.from_numpy(s.sar).permute(2, 0, 1).float().repeat(channels["sar"], 1, 1)} for s in scenes]
    return labelled(images, [torch.from_numpy(s.labels).long() for s in scenes], [f"scene{i}" for i in range(n)])


def folder_segmentation(root: str, masks: str, channels: dict[str, int], nodata: int = -1) -> SegmentationData:
    """A paired folder with a folder of label rasters of the same stems and sizes, at native resolution;
    ``nodata`` labels are ignored."""
    source = FolderSource(SourceConfig(kind="paired", root=root), channels)
    images, maps = [], []
    for i, path in enumerate(mask_files(source, masks)):
        arrays = source.load(i)
        mask = torch.from_numpy(read_mask(path))
        if mask.shape != arrays["opt"].shape[:2]:
            raise DataError(f"label raster {path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                            f"'{source.stems[i]}' is {arrays['opt'].shape[1]}x{arrays['opt'].shape[0]}")
        mask[mask == nodata] = IGNORE
        for a in arrays.values():  # a file's nodata pixels (NaN): ignored in the labels, 0 in the image
            mask[torch.from_numpy(np.isnan(a).any(2))] = IGNORE
        images.append({m: torch.from_numpy(np.nan_to_num(a, nan=0.0)).permute(2, 0, 1).float()
                       for m, a in arrays.items()})
        maps.append(mask)
    return labelled(images, maps, list(source.stems))


def scene_regions(files: dict[str, str], mask_file: str, channels: dict[str, int], bands: dict[str, list[int]],
                  scaling: dict[str, ScalingConfig], train_fraction: float, nodata: int = -1) -> SegmentationData:
    """One co-registered scene (``files[m]`` per modality) and its label raster as two samples: the top
    ``train_fraction`` of the rows (``train``) and the rest (``test``), spatially apart. Bands are picked
    by index before scaling; ``nodata`` labels and non-finite pixels are ignored."""
    mask = read_mask(Path(mask_file))
    images = {}
    for m, path in files.items():
        raw, nodata_value = read_raster(path)
        finite = np.isfinite(raw).all(axis=2) & valid_pixels(raw, nodata_value)  # NaN or the file's nodata
        if raw.shape[:2] != mask.shape:
            raise DataError(f"scene image {path} is {raw.shape[1]}x{raw.shape[0]} but its label raster "
                            f"{mask_file} is {mask.shape[1]}x{mask.shape[0]}")
        mask[~finite] = nodata  # real rasters carry NaN where there is no data: those pixels are ignored
        raw = np.where(finite[:, :, None], raw, 0).astype(raw.dtype) if not finite.all() else raw
        unit = unit_array(raw, scaling[m], channels[m], path, f"model.{m}_channels", bands.get(m))
        images[m] = torch.from_numpy(unit).permute(2, 0, 1).float()
    mask[mask == nodata] = IGNORE
    labels = torch.from_numpy(mask)
    cut = int(round(train_fraction * labels.shape[0]))
    if not 0 < cut < labels.shape[0]:
        raise ConfigError(f"--train-fraction {train_fraction} leaves no rows for training or testing")
    parts = [slice(0, cut), slice(cut, None)]
    return labelled([{m: x[:, rows] for m, x in images.items()} for rows in parts], [labels[rows] for rows in parts],
                    ["train", "test"])


def choose_split(data: SegmentationData, lists: dict[str, str], train_fraction: float, data_root: str = ""
                 ) -> tuple[dict[str, np.ndarray], str]:
    """The given split lists (names as :func:`codemae.eval.splits.list_indices` reads them, no name in
    two lists), or else the first ``train_fraction`` of the samples for training and the rest for
    testing; with a description saying which."""
    if lists:
        if "train" not in lists or "test" not in lists:
            raise ConfigError("give both --train and --test split lists (--val is optional)")
        split = {p: list_indices(read_split_list(v), data.names, Path(v), data_root) for p, v in lists.items()}
        check_disjoint(split, lists, data.names)
        return split, "given split lists (" + ", ".join(f"--{k} {v}" for k, v in lists.items()) + ")"
    cut = int(round(train_fraction * len(data.masks)))
    if not 0 < cut < len(data.masks):
        raise ConfigError(f"--train-fraction {train_fraction} of {len(data.masks)} samples leaves none for "
                          "training or testing")
    n = len(data.masks)
    return ({"train": np.arange(cut), "test": np.arange(cut, n)},
            f"no split lists: first {cut} of {n} samples train, the rest test")


def channel_stats(data: SegmentationData, indices: np.ndarray) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel mean and (unbiased) std over every pixel of the images ``indices`` (the training
    images), per modality."""
    stats = {}
    for m in data.images[0]:
        mean, std = image_channel_stats(data.images[i][m] for i in indices)
        stats[m] = (mean.float(), std.float())
    return stats


def normalised(data: SegmentationData, stats: dict[str, tuple[Tensor, Tensor]]) -> SegmentationData:
    """Every image standardised with ``stats`` (per modality: per-channel mean, std)."""
    images = [{m: (x - stats[m][0][:, None, None]) / stats[m][1][:, None, None] for m, x in s.items()}
              for s in data.images]
    return dataclasses.replace(data, images=images)


def training_crop(data: SegmentationData, train_idx: np.ndarray, crop: int, patch: int) -> int:
    """``crop``, lowered to the smallest side of the training images when they are smaller (rounded
    down to the patch size): padding tiny tiles to a 512-px crop would only add ignored pixels."""
    if crop % patch:
        raise ConfigError(f"--crop {crop} is not a multiple of the encoder's patch size {patch}")
    smallest = min(min(data.masks[i].shape) for i in train_idx)
    size = min(crop, smallest // patch * patch)
    if size < patch:
        raise ConfigError(f"training images of {smallest} px are smaller than one {patch}-px patch")
    return size


def random_crops(data: SegmentationData, train_idx: np.ndarray, crop: int, batch: int,
                 generator: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
    """``batch`` crops of ``crop`` px from uniformly drawn training images, each flipped horizontally
    with probability 1/2; a side shorter than ``crop`` is padded (images 0, labels ignored)."""
    images: dict[str, list[Tensor]] = {m: [] for m in data.images[0]}
    masks = []
    for _ in range(batch):
        i = int(train_idx[torch.randint(len(train_idx), (1,), generator=generator)])
        mask = data.masks[i]
        h, w = mask.shape
        y = int(torch.randint(max(h - crop, 0) + 1, (1,), generator=generator))
        x = int(torch.randint(max(w - crop, 0) + 1, (1,), generator=generator))
        flip = bool(torch.rand(1, generator=generator) < 0.5)
        pad = (0, max(crop - w, 0), 0, max(crop - h, 0))
        for m, image in data.images[i].items():
            piece = F.pad(image[:, y:y + crop, x:x + crop], pad)
            images[m].append(piece.flip(-1) if flip else piece)
        piece = F.pad(mask[y:y + crop, x:x + crop], pad, value=data.ignore)
        masks.append(piece.flip(-1) if flip else piece)
    return {m: torch.stack(v) for m, v in images.items()}, torch.stack(masks)


def optimiser(model: Segmenter, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, grouped by layer id (``lr_scale`` = decay^(num_layers - id),
    head at 1) and weight decay (none for biases, norms, position embeddings)."""
    groups = layer_decay_groups(model, recipe.lr, recipe.weight_decay, recipe.layer_decay)
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in groups]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=recipe.lr, betas=(0.9, 0.999))


def segmentation_loss(outs: dict[str, Tensor], target: Tensor, ignore: int, aux_weight: float) -> Tensor:
    """Cross-entropy of the decode head (mean over labelled pixels) + ``aux_weight`` x that of the auxiliary head."""
    loss = F.cross_entropy(outs["main"], target, ignore_index=ignore)
    if "aux" in outs:
        loss = loss + aux_weight * F.cross_entropy(outs["aux"], target, ignore_index=ignore)
    return loss


def train_segmenter(model: Segmenter, data: SegmentationData, train_idx: np.ndarray, recipe: Recipe, crop: int,
                    seed: int) -> dict[str, list]:
    """``recipe.iters`` AdamW steps on random crops (poly schedule per iteration, gradient clipping);
    returns the base lr and the loss of every step (a batch without labelled pixels is skipped: None)."""
    generator = torch.Generator().manual_seed(seed)
    device = module_device(model)
    optimizer = optimiser(model, recipe)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    log: dict[str, list] = {"lr": [], "loss": []}
    model.train()
    for it in tqdm(range(recipe.iters), desc=f"segmentation (seed {seed})", unit="it", disable=None, leave=False):
        lr = poly_lr_at(it, recipe.lr, recipe.iters, recipe.power, recipe.min_lr, recipe.warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        log["lr"].append(lr)
        images, target = random_crops(data, train_idx, crop, recipe.batch_size, generator)
        images, target = {m: x.to(device) for m, x in images.items()}, target.to(device)
        if bool((target == data.ignore).all()):
            log["loss"].append(None)  # nothing labelled in this batch: no loss to learn from
            continue
        loss = segmentation_loss(model.outputs(images), target, data.ignore, recipe.aux_weight)
        optimizer.zero_grad()
        loss.backward()
        if recipe.clip_grad:
            nn.utils.clip_grad_norm_(params, recipe.clip_grad)
        optimizer.step()
        log["loss"].append(loss.item())
    return log


def predict_image(model: nn.Module, image: dict[str, Tensor], modalities: tuple[str, ...], window: int,
                  stride: int) -> Tensor:
    """Class logits ``(K, H, W)`` of one image by sliding ``window``-px windows at ``stride``, logits
    of overlapping windows averaged (mmseg's ``slide`` test mode)."""
    model.eval()
    device = module_device(model)
    return sliding_window(lambda crops: model(dict(zip(modalities, crops))), [image[m].to(device) for m in modalities],
                          window, stride).cpu()


def evaluate(model: Segmenter, data: SegmentationData, indices: np.ndarray, window: int, stride: int) -> float:
    """Dataset-level mIoU (%) of the sliding-window predictions over the images ``indices`` (one
    confusion matrix summed image by image, as mmseg's IoUMetric)."""
    total = sum(confusion(predict_image(model, data.images[i], model.modalities, window, stride).argmax(0),
                          data.masks[i], data.num_classes, data.ignore) for i in indices)
    return miou_of(total)


def confusion(pred: Tensor, target: Tensor, num_classes: int, ignore: int) -> Tensor:
    """(K, K) pixel counts, rows target and columns prediction; ``ignore`` pixels skipped."""
    return multiclass_confusion_matrix(pred.flatten(), target.flatten(), num_classes, ignore_index=ignore)


def class_iou(matrix: Tensor) -> Tensor:
    """IoU per class of a confusion matrix (float64), NaN for a class absent from prediction and target."""
    cm = matrix.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def miou_of(matrix: Tensor) -> float:
    """Mean IoU (%) over the classes present in prediction or target of a confusion matrix."""
    return 100 * float(class_iou(matrix).nanmean())


def run_segmentation(load: Callable[[], PretrainMethod], data: SegmentationData, modality: str, recipe: Recipe,
                     seeds: list[int], split: dict[str, np.ndarray]) -> dict:
    """Per seed: a fresh encoder from ``load()``, a fresh head, ``recipe`` training on the ``train``
    images (normalised with their own statistics), mIoU (%) on ``test`` (and ``val`` if given)."""
    data = normalised(data, channel_stats(data, split["train"]))
    modalities = MODALITY_SETS[modality]
    per_seed, seconds, losses = [], [], []
    crop = stride = 0
    for seed in seeds:
        start = time.perf_counter()
        method = load()
        torch.manual_seed(seed)
        model = Segmenter(method, modalities, data.num_classes, recipe.train_encoder, recipe.head, recipe.channels,
                          recipe.aux_head).to(module_device(method))
        crop = training_crop(data, split["train"], recipe.crop, method.encoder.patch_size)
        stride = min(recipe.stride or max(crop // 2, 1), crop)  # the crop may have been lowered
        log = train_segmenter(model, data, split["train"], recipe, crop, seed)
        losses.append(log["loss"])
        result = {"mIoU": evaluate(model, data, split["test"], crop, stride)}
        if "val" in split:
            result["val mIoU"] = evaluate(model, data, split["val"], crop, stride)
        per_seed.append(result)
        seconds.append(time.perf_counter() - start)
    return {"summary": summarise(per_seed), "recipe": dataclasses.asdict(recipe), "crop": crop, "stride": stride,
            "train_images": len(split["train"]), "test_images": len(split["test"]), "classes": data.classes,
            "seconds_per_seed": seconds, "train_loss_per_seed": losses}
