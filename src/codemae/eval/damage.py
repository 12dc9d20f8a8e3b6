"""Bi-temporal building damage assessment: a Siamese model on the shared encoder, fine-tuned.

The optical pre-event image goes through the optical patch embedding, the SAR post-event image
through the SAR one, each on its own through the shared trunk; their pyramid levels are fused per
level (``pre``, ``post`` and ``|pre - post|`` concatenated -> 3x3 conv) and the light UperNet-style
FPN head (:class:`codemae.eval.seg_heads.LightHead`, top-down over the levels) predicts 2
localisation logits (background / building) and 4 damage logits (background / intact / damaged /
destroyed) per pixel. Loss: cross-entropy of the 4-class map + cross-entropy of the localisation,
both class-weighted by the training pixels' frequency^-1/2 (buildings are a few percent of a
scene). Prediction: background where the localisation says so, else the most likely of the three
damage classes. Scenes larger than the input go through
:func:`codemae.eval.sliding_window.sliding_window`. Metrics (BRIGHT / xView2) come from one
confusion matrix over every test pixel.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_confusion_matrix
from tqdm import tqdm

from codemae.data.stats import compute_stats
from codemae.data.synthetic import DAMAGE_CLASSES
from codemae.data.transforms import Normalisation
from codemae.errors import ConfigError
from codemae.eval.damage_data import NUM_CLASSES, DamageCrops, DamageScenes
from codemae.eval.device import module_device
from codemae.eval.finetune import layer_decay_groups
from codemae.eval.report import summarise
from codemae.eval.seg_heads import ConvBNReLU, LightHead
from codemae.eval.segmentation import class_iou, level_maps, miou_of
from codemae.eval.sliding_window import sliding_window
from codemae.methods import PretrainMethod
from codemae.train.optim import lr_at

LOC_CLASSES = 2
LOC_WEIGHT = 0.3  # xView2's weight of localisation in the overall score


@dataclass(frozen=True)
class DamageProtocol:
    """Fine-tuning settings: AdamW, warm-up + cosine, layer-wise lr decay on the encoder."""

    epochs: int = 20
    warmup_epochs: int = 1
    batch_size: int = 8
    crops_per_scene: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.05
    layer_decay: float = 0.85
    drop_path: float = 0.1
    stats_samples: int = 64


class SiameseDamage(nn.Module):
    """Shared encoder on (optical pre, SAR post), per-level fusion, FPN head; ``forward`` returns
    (B, 2 + 4, H, W) logits: localisation then damage."""

    def __init__(self, method: PretrainMethod, width: int = 64) -> None:
        super().__init__()
        self.method = method
        encoder = method.encoder
        dims = [d // (s * s) for d, s in zip(encoder.level_dims, encoder.level_grids)]
        self.fuse = nn.ModuleList(ConvBNReLU(3 * d, width, 3) for d in dims)
        self.head = LightHead([width] * len(dims), LOC_CLASSES + NUM_CLASSES, width)

    def levels(self, image: Tensor, modality: str) -> list[Tensor]:
        """(B, C_l, H_l, W_l) pyramid maps of ``image`` through ``modality``'s patch embedding."""
        encoder = self.method.encoder
        out = self.method.encode_outputs({modality: image})[modality]
        return level_maps(out.levels, encoder.level_grids, image.shape[-1] // encoder.patch_size)

    def forward(self, pre: Tensor, post: Tensor) -> Tensor:
        maps = [fuse(torch.cat([a, b, (a - b).abs()], 1))
                for fuse, a, b in zip(self.fuse, self.levels(pre, "opt"), self.levels(post, "sar"))]
        return F.interpolate(self.head(maps), size=pre.shape[-2:], mode="bilinear", align_corners=False)


def balanced_weights(counts: Tensor) -> Tensor:
    """Class weights proportional to frequency^-1/2 (a class never seen counts as one pixel), scaled so
    that the weighted mean over the pixels is 1: rare damage classes are not drowned by background."""
    freq = counts.double().clamp_min(1) / counts.sum().clamp_min(1)
    weights = freq.rsqrt()
    return (weights / (weights * freq).sum()).float()


def damage_loss(logits: Tensor, target: Tensor, counts: Tensor | None = None) -> Tensor:
    """Cross-entropy of the 4-class damage map plus that of building-vs-background, class-weighted by
    :func:`balanced_weights` of the training pixel ``counts`` per class when given."""
    building = (target > 0).long()
    damage_w = loc_w = None
    if counts is not None:
        damage_w, loc_w = balanced_weights(counts), balanced_weights(torch.stack([counts[0], counts[1:].sum()]))
    return (F.cross_entropy(logits[:, LOC_CLASSES:], target, weight=damage_w)
            + F.cross_entropy(logits[:, :LOC_CLASSES], building, weight=loc_w))


def damage_map(logits: Tensor) -> Tensor:
    """(..., 6, H, W) logits -> (..., H, W) labels: 0 where localisation says background, else the most
    likely of intact / damaged / destroyed."""
    building = logits[..., :LOC_CLASSES, :, :].argmax(-3) == 1
    damage = logits[..., LOC_CLASSES + 1:, :, :].argmax(-3) + 1
    return torch.where(building, damage, torch.zeros_like(damage))


def f1(tp: Tensor, fp: Tensor, fn: Tensor) -> float:
    """2TP / (2TP + FP + FN); NaN when all three are 0 (a class absent from target and prediction)."""
    total = 2 * tp + fp + fn
    return float(2 * tp / total) if total > 0 else float("nan")


def damage_scores(confusion: Tensor) -> dict[str, float]:
    """BRIGHT and xView2 metrics (%) from a (4, 4) confusion matrix (rows: target, columns: prediction).

    IoU per class and their mean over the classes present in target or prediction; localisation F1
    (building = any class > 0); damage F1 = harmonic mean of the per-class F1 of intact, damaged and
    destroyed on the target's building pixels (a class absent from both target and prediction there
    is left out); overall = 0.3 localisation F1 + 0.7 damage F1.
    """
    cm = confusion.double()
    iou = class_iou(cm)
    scores = {"mIoU": miou_of(cm)}
    scores |= {f"IoU {name}": 100 * float(v) for name, v in zip(DAMAGE_CLASSES, iou)}
    loc = f1(cm[1:, 1:].sum(), cm[0, 1:].sum(), cm[1:, 0].sum())
    on_buildings = cm[1:]  # rows of building pixels, every predicted class
    per_class = {name: f1(on_buildings[c - 1, c], on_buildings[:, c].sum() - on_buildings[c - 1, c],
                          on_buildings[c - 1].sum() - on_buildings[c - 1, c])
                 for c, name in enumerate(DAMAGE_CLASSES) if c > 0}
    present = [v for v in per_class.values() if v == v]
    damage = float(statistics.harmonic_mean(present)) if present else float("nan")
    scores |= {"F1 loc": 100 * loc, "F1 damage": 100 * damage}
    scores |= {f"F1 {name}": 100 * v for name, v in per_class.items()}
    scores["score"] = 100 * (LOC_WEIGHT * loc + (1 - LOC_WEIGHT) * damage)
    return scores


@torch.no_grad()
def predict_scene(model: SiameseDamage, pre: Tensor, post: Tensor, window: int) -> Tensor:
    """(H, W) damage labels of one scene: sliding windows at half-window stride, logits averaged."""
    model.eval()
    device = module_device(model)
    logits = sliding_window(lambda crops: model(crops[0], crops[1]), [pre.to(device), post.to(device)], window,
                            max(window // 2, 1))
    return damage_map(logits).cpu()


def evaluate(model: SiameseDamage, scenes: DamageScenes, norms: dict[str, Normalisation], window: int) -> dict:
    """:func:`damage_scores` of ``model``'s sliding-window predictions over every scene of ``scenes``."""
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    for i in tqdm(range(len(scenes)), desc=f"predicting {scenes.name}", disable=None, leave=False):
        pre, post, target = scenes.tensors(i, norms)
        confusion += multiclass_confusion_matrix(predict_scene(model, pre, post, window).flatten(),
                                                 target.flatten(), NUM_CLASSES)
    return damage_scores(confusion)


def train_damage(model: SiameseDamage, crops: DamageCrops, protocol: DamageProtocol, seed: int,
                 counts: Tensor | None = None) -> list[float]:
    """Fine-tune ``model`` (layer-wise lr decay on the encoder; the loss class-weighted by the training
    pixel ``counts`` per class when given); the mean loss of every epoch."""
    torch.manual_seed(seed)
    loader = DataLoader(crops, batch_size=protocol.batch_size, shuffle=True, drop_last=len(crops) > protocol.batch_size,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(layer_decay_groups(model, protocol.lr, protocol.weight_decay, protocol.layer_decay))
    total, warmup, step, history = protocol.epochs * len(loader), protocol.warmup_epochs * len(loader), 0, []
    for _ in tqdm(range(protocol.epochs), desc=f"fine-tuning (seed {seed})", unit="epoch", disable=None, leave=False):
        model.train()
        losses = []
        for batch in loader:
            pre, post, target = (x.to(module_device(model)) for x in batch)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, protocol.lr, warmup, total) * group["lr_scale"]
            loss = damage_loss(model(pre, post), target, None if counts is None else counts.to(target.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        history.append(statistics.mean(losses))
    return history


def fresh_model(load: Callable[[int], PretrainMethod], seed: int) -> SiameseDamage:
    """The encoder from ``load(seed)`` (a random one initialised from the seed) and a decoder initialised
    from ``seed`` (seeded after the load, which may seed torch itself)."""
    method = load(seed)
    torch.manual_seed(seed)
    return SiameseDamage(method)


def run_damage(load: Callable[[int], PretrainMethod], root: str, protocol: DamageProtocol, seeds: list[int],
               window: int | None = None) -> dict:
    """Per seed: a fresh encoder from ``load(seed)``, fine-tuned on the train list, scored on val and test
    after the last epoch (nothing is chosen on either)."""
    encoder = load(seeds[0]).encoder
    size = window or encoder.img_size
    if size % encoder.patch_size:
        raise ConfigError(f"--img-size {size}: not a multiple of the encoder's patch size {encoder.patch_size}")
    splits = {s: DamageScenes(root, s, encoder.channels) for s in ("train", "val", "test")}
    counts = {s: scenes.class_counts() for s, scenes in splits.items()}  # reads every label once: bad ones stop here
    norms = compute_stats(splits["train"], protocol.stats_samples)
    per_seed, val, curves = [], [], []
    for seed in seeds:
        model = fresh_model(load, seed)
        crops = DamageCrops(splits["train"], norms, size, protocol.crops_per_scene,
                            torch.Generator().manual_seed(seed))
        curves.append(train_damage(model, crops, protocol, seed, counts["train"]))
        val.append(evaluate(model, splits["val"], norms, size))
        per_seed.append(evaluate(model, splits["test"], norms, size))
    return {"summary": summarise(per_seed), "val_summary": summarise(val), "train_loss": curves,
            "scenes": {s: len(v) for s, v in splits.items()}, "window": size, "epochs": protocol.epochs,
            "pixels_per_class": {s: dict(zip(DAMAGE_CLASSES, c.tolist())) for s, c in counts.items()}}
