"""Object detection: torchvision's Faster R-CNN on a codemae encoder turned into an FPN.

HiViT + iTPN: the pyramid's stride-4, 8 and 16 levels become maps, an FPN
(``FeaturePyramidNetwork``) adds them top-down and ``LastLevelMaxPool`` gives stride 32.
A plain ViT (one stride-16 level): a simple feature pyramid from the last block
(transposed convolutions to strides 4 and 8, max-pooling to 32), then the same FPN.
RPN, RoIAlign (``MultiScaleRoIAlign``), NMS and the 4-conv + 1-fc box head are torchvision's.

Recipe (the authors' DIOR / SARDet-100K configs): AdamW lr 3e-4 at batch 16 (scaled
linearly with the batch), weight decay 0.05, betas (0.9, 0.999), layer-wise lr decay 0.85,
drop path 0.15, gradient clipping at norm 35, linear warm-up from 0.001x over 500 iterations
(at most one epoch), step decay x0.1 at epochs 8 and 11 of 12 (1x) or 27 and 33 of 36 (3x).
Anchors 8 x stride (32..256 px) with ratios 0.5, 1, 2, as mmdetection's Faster R-CNN on these four
levels (its RPN has a fifth, stride 64 / 512 px, which the issue's four-level FPN leaves out).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from tqdm import tqdm

from codemae.errors import ConfigError, TrainingError
from codemae.eval.detection_data import DetectionImages, collate
from codemae.eval.device import module_device
from codemae.eval.finetune import layer_decay_groups
from codemae.eval.report import summarise
from codemae.eval.segmentation import level_maps
from codemae.methods import PretrainMethod

SCHEDULES = {"1x": (12, (8, 11)), "3x": (36, (27, 33))}
FPN_WIDTH = 256
STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class DetectionRecipe:
    epochs: int = 12
    milestones: tuple[int, ...] = (8, 11)
    batch_size: int = 4
    base_lr: float = 3e-4  # at batch 16
    weight_decay: float = 0.05
    layer_decay: float = 0.85
    drop_path: float = 0.15
    clip_norm: float = 35.0
    warmup_iters: int = 500
    warmup_start: float = 0.001
    gamma: float = 0.1
    fpn_width: int = FPN_WIDTH
    box_head: str = "4conv1fc"  # the authors' ConvFCBBoxHead; "2fc": torchvision's TwoMLPHead (cheaper)
    rois_per_image: int = 512  # RoIs sampled per image to train the box head


def schedule(name: str, epochs: int | None = None) -> tuple[int, tuple[int, ...]]:
    """(epochs, lr-step epochs) of the 1x / 3x schedule, the steps scaled to ``epochs`` when given."""
    if name not in SCHEDULES:
        raise ConfigError(f"--schedule {name}: choose {' or '.join(SCHEDULES)}")
    full, steps = SCHEDULES[name]
    if epochs is None:
        return full, steps
    if epochs < 1:
        raise ConfigError(f"--epochs {epochs}: must be at least 1")
    return epochs, tuple(round(s * epochs / full) for s in steps)


def lr_factor(step: int, steps_per_epoch: int, recipe: DetectionRecipe) -> float:
    """Multiplier of the peak lr at iteration ``step``: linear warm-up, then x gamma at each milestone."""
    warmup = min(recipe.warmup_iters, steps_per_epoch)
    warm = recipe.warmup_start + (1 - recipe.warmup_start) * step / warmup if step < warmup else 1.0
    epoch = step // steps_per_epoch
    return warm * recipe.gamma ** sum(epoch >= m for m in recipe.milestones)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet-style maps at strides 4, 8, 16, 32 from one stride-16 map of ``dim`` channels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dims = [dim // 4, dim // 2, dim, dim]
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, 2), nn.GELU(),
                                 nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2))
        self.up8 = nn.ConvTranspose2d(dim, dim // 2, 2, 2)
        self.down32 = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.up4(x), self.up8(x), x, self.down32(x)]


class EncoderFPN(nn.Module):
    """A codemae encoder (one modality's patch embedding) as a torchvision detection backbone:
    an OrderedDict of ``FPN_WIDTH``-channel maps at strides 4, 8, 16, 32 (patch size 16; in general
    patch / 4 to 2 x patch, which RoIAlign and the anchors read off the map sizes). Method parts outside
    the encoder (decoders, pretraining heads) are frozen: they take no part."""

    def __init__(self, method: PretrainMethod, modality: str, width: int = FPN_WIDTH) -> None:
        super().__init__()
        encoder = method.encoder
        if modality not in encoder.channels:
            raise ConfigError(f"--modality {modality}: the encoder embeds only {', '.join(encoder.channels)}")
        method.requires_grad_(False)
        encoder.requires_grad_(True)
        self.method, self.modality, self.out_channels = method, modality, width
        if len(encoder.level_grids) > 1:  # the iTPN pyramid, coarsest first: strides 16, 8, 4
            dims = [d // (s * s) for d, s in zip(encoder.level_dims, encoder.level_grids)][::-1]
            self.simple = None
            self.fpn = FeaturePyramidNetwork(dims, width, LastLevelMaxPool())
        else:
            self.simple = SimpleFeaturePyramid(encoder.level_dims[0])
            self.fpn = FeaturePyramidNetwork(self.simple.dims, width)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        encoder = self.method.encoder
        levels = self.method.encode_outputs({self.modality: x})[self.modality].levels
        maps = level_maps(levels, encoder.level_grids, x.shape[-1] // encoder.patch_size)[::-1]  # finest first
        if self.simple is not None:
            maps = self.simple(maps[0])
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class PresizedTransform(GeneralizedRCNNTransform):
    """Normalise and batch (zero-padded to a multiple of 32) only: transforms v2 sized the images."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target


class Detector(nn.Module):
    """Faster R-CNN with ``num_classes`` object classes (+ background) on the encoder's FPN. The method
    is registered first, so its encoder's parameters are named ``method.encoder.*`` (what the
    layer-wise lr decay groups look for); ``rcnn`` shares them through its backbone."""

    def __init__(self, method: PretrainMethod, modality: str, num_classes: int, size: int,
                 mean: list[float], std: list[float], recipe: DetectionRecipe = DetectionRecipe()) -> None:
        super().__init__()
        self.method = method
        width = recipe.fpn_width
        backbone = EncoderFPN(method, modality, width)
        featmaps = ["0", "1", "2", "3"] if backbone.simple is not None else ["0", "1", "2", "pool"]
        anchors = AnchorGenerator(tuple((8 * s,) for s in STRIDES), ((0.5, 1.0, 2.0),) * len(STRIDES))
        if recipe.box_head == "4conv1fc":
            head = FastRCNNConvFCHead((width, 7, 7), [width] * 4, [1024], norm_layer=nn.BatchNorm2d)
        elif recipe.box_head == "2fc":
            head = TwoMLPHead(width * 7 * 7, 1024)
        else:
            raise ConfigError(f"--box-head {recipe.box_head}: choose 4conv1fc or 2fc")
        self.rcnn = FasterRCNN(backbone, num_classes + 1, rpn_anchor_generator=anchors, box_head=head,
                               box_roi_pool=MultiScaleRoIAlign(featmaps, 7, 2),
                               box_batch_size_per_image=recipe.rois_per_image)
        self.rcnn.transform = PresizedTransform(size, size, mean, std, size_divisible=32)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: the dict of losses; evaluation: detections per image (labels 1..K)."""
        return self.rcnn(images, targets)


def training_targets(targets: list[dict[str, Tensor]], device: torch.device) -> list[dict[str, Tensor]]:
    """Plain-tensor targets without the ignored boxes, labels shifted past background (0)."""
    out = []
    for t in targets:
        keep = t["iscrowd"] == 0
        out.append({"boxes": t["boxes"].as_subclass(Tensor)[keep].to(device),
                    "labels": (t["labels"][keep] + 1).to(device)})
    return out


def plain(images: list[Tensor], device: torch.device) -> list[Tensor]:
    return [im.as_subclass(Tensor).to(device) for im in images]


def train_detector(model: Detector, data: DetectionImages, recipe: DetectionRecipe, seed: int,
                   progress: bool = False) -> list[float]:
    """Fine-tune end to end; the loss of every iteration."""
    torch.manual_seed(seed)
    loader = DataLoader(data, batch_size=recipe.batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))
    lr = recipe.base_lr * recipe.batch_size / 16
    groups = [dict(g, params=[p for p in g["params"] if p.requires_grad])
              for g in layer_decay_groups(model, lr, recipe.weight_decay, recipe.layer_decay)]
    groups = [g for g in groups if g["params"]]  # the frozen method parts outside the encoder left out
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    steps = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, recipe))
    params = [p for p in model.parameters() if p.requires_grad]
    losses, device = [], module_device(model)
    bar = tqdm(total=recipe.epochs * steps, desc=f"seed {seed}", unit="step", disable=not progress,
               dynamic_ncols=True)
    model.train()
    for _ in range(recipe.epochs):
        for images, targets in loader:
            parts = model(plain(images, device), training_targets(targets, device))
            loss = sum(parts.values())
            if not math.isfinite(loss.item()):
                raise TrainingError(f"detection loss became {loss.item()} at step {len(losses)} (seed {seed})")
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, recipe.clip_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return losses


@torch.no_grad()
def predict(model: Detector, data: DetectionImages, batch_size: int = 8) -> list[dict[str, Tensor]]:
    """Detections per image, labels back in 0..K-1."""
    model.eval()
    out, device = [], module_device(model)
    for images, _ in DataLoader(data, batch_size=batch_size, collate_fn=collate):
        for det in model(plain(images, device)):
            out.append({"boxes": det["boxes"].cpu(), "scores": det["scores"].cpu(), "labels": det["labels"].cpu() - 1})
    return out


def detection_metrics(preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]],
                      classes: list[str]) -> dict[str, float]:
    """COCO-style mAP50 and mAP50:95 (%) and per-class AP50 (classes with test boxes), via torchmetrics;
    targets with ``iscrowd`` 1 are ignored regions."""
    targets = [{"boxes": t["boxes"].as_subclass(Tensor), "labels": t["labels"], "iscrowd": t["iscrowd"]}
               for t in targets]
    coco = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    at50 = MeanAveragePrecision(iou_type="bbox", iou_thresholds=[0.5], class_metrics=True, backend="pycocotools")
    for metric in (coco, at50):
        metric.update(preds, targets)
    overall, per_class = coco.compute(), at50.compute()
    out = {"mAP50": 100 * per_class["map"].item(), "mAP50:95": 100 * overall["map"].item()}
    present = sorted({int(c) for t in targets for c in t["labels"][t["iscrowd"] == 0]})
    ap = dict(zip(per_class["classes"].reshape(-1).tolist(), per_class["map_per_class"].reshape(-1).tolist()))
    out.update({f"AP50 {classes[c]}": 100 * max(ap.get(c, 0.0), 0.0) for c in present})
    return out


def run_detection(load: Callable[[int], PretrainMethod], train: DetectionImages, test: DetectionImages,
                  modality: str, size: int, recipe: DetectionRecipe, seeds: list[int], progress: bool = False,
                  device: torch.device | str = "cpu") -> dict:
    """Per seed: ``load(seed)`` a fresh encoder, build and fine-tune the detector (its own head
    initialisation and shuffling), score the fixed test set once after the last epoch."""
    mean, std = train.channel_stats()
    per_seed, final_losses = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        model = Detector(load(seed), modality, len(train.data.classes), size, mean, std, recipe).to(device)
        losses = train_detector(model, train, recipe, seed, progress)
        final_losses.append(sum(losses[-10:]) / len(losses[-10:]))
        per_seed.append(detection_metrics(predict(model, test), test.targets, train.data.classes))
    return {"summary": summarise(per_seed), "per_seed": per_seed, "final_train_loss": final_losses,
            "normalisation": {"mean": mean, "std": std}}
