"""Fine-tuning a whole encoder with a linear head, by the published recipes (SPEC section 3,
the CoDe-MAE authors' ``classification/`` code, Fus-MAE's multi-label fine-tuning).

Head: mean-pooled final tokens (modalities concatenated) -> fc_norm (LayerNorm, eps 1e-6) ->
[BatchNorm1d, no affine, eps 1e-6: the SAR recipes] -> Linear (truncated normal 0.01, zero bias).
AdamW (betas 0.9, 0.999), lr = base_lr x batch / 256, per-iteration linear warm-up then cosine to
1e-6, layer-wise lr decay ``decay^(num_layers - layer id)`` with the encoder's layer ids.

- ``sar-target`` (MSTAR, FUSAR-Ship): wd 0.05, base lr 1e-3, batch 50, 60 epochs (2 warm-up),
  layer decay 0.85, drop path 0.05, no augmentation, centre-crop 128 then resize; ``sar-acd``: the
  same with layer decay 1.0.
- ``optical-scene`` (AID 0.85 / RESISC45 0.95 via ``--layer-decay``): batch 32, 100 epochs (5
  warm-up), drop path 0.1; RandomResizedCrop + flip + RandAugment(2, 9) (torchvision v2), then
  normalisation and RandomErasing 0.25; mixup 0.8 / cutmix 1.0 (switch 0.5) with label smoothing
  0.1 folded into the soft targets (timm ``Mixup``), soft-target cross-entropy.
- ``multilabel`` (Fus-MAE, BigEarthNet-MM): MultiLabelSoftMarginLoss, AdamW, 10 epochs; micro and
  macro mAP. Fus-MAE does not publish its lr, batch or schedule; the values here are codemae's.

Results: the honest one (test score at the evaluation epoch with the best validation score, or at
the last epoch when no validation split exists; test labels scored only after training) and the
named reference one (the authors' code: best test score over its evaluations at epoch 1, every 5
epochs and the last).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import InterpolationMode, v2

from codemae.data.transforms import Normalisation
from codemae.errors import ConfigError
from codemae.eval.data import EvalImages, LabelledSet
from codemae.eval.device import module_device
from codemae.eval.features import MODALITY_SETS, eval_norms, input_size
from codemae.eval.probe import metrics, reference_epochs, score
from codemae.eval.protocols import REFERENCE_KEY, honest_key, training_indices
from codemae.eval.report import summarise
from codemae.eval.splits import Split
from codemae.methods import PretrainMethod
from codemae.train.optim import decays, declared_no_decay, lr_at


@dataclass(frozen=True)
class FinetuneProtocol:
    epochs: int
    warmup_epochs: int
    batch_size: int
    base_lr: float
    weight_decay: float
    layer_decay: float
    drop_path: float
    label_smoothing: float
    augment: bool            # RandomResizedCrop + flip + RandAugment, RandomErasing ``erase_prob``
    centre_crop: int | None
    bn_head: bool = False    # BatchNorm1d (no affine) between fc_norm and the head
    mixup: float = 0.0       # mixup alpha (0: off)
    cutmix: float = 0.0      # cutmix alpha (0: off)
    erase_prob: float = 0.0
    multilabel: bool = False
    min_lr: float = 1e-6


SAR_TARGET = FinetuneProtocol(60, 2, 50, 1e-3, 0.05, 0.85, 0.05, 0.0, False, 128, bn_head=True)
PROTOCOLS = {
    "sar-target": SAR_TARGET,
    "sar-acd": replace(SAR_TARGET, layer_decay=1.0),
    "optical-scene": FinetuneProtocol(100, 5, 32, 1e-3, 0.05, 0.85, 0.1, 0.1, True, None, mixup=0.8, cutmix=1.0,
                                      erase_prob=0.25),
    "multilabel": FinetuneProtocol(10, 1, 64, 1e-3, 0.05, 1.0, 0.0, 0.0, False, None, multilabel=True),
}

ENCODER_PREFIX = "method.encoder."


class Classifier(nn.Module):
    """Encoder tokens, mean-pooled (modalities concatenated), -> fc_norm -> [BatchNorm1d] -> Linear."""

    def __init__(self, method: PretrainMethod, modalities: tuple[str, ...], num_classes: int,
                 bn_head: bool = True) -> None:
        super().__init__()
        self.method, self.modalities = method, modalities
        dim = method.encoder.embed_dim * len(modalities)
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if bn_head else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: dict[str, Tensor]) -> Tensor:
        tokens = self.method.encode({m: images[m] for m in self.modalities})
        pooled = torch.cat([tokens[m].mean(1) for m in self.modalities], dim=-1)
        return self.head(self.norm(self.fc_norm(pooled)))


def layer_decay_groups(model: Classifier, lr: float, weight_decay: float, decay: float) -> list[dict]:
    """AdamW parameter groups with lr x decay^(num_layers - layer), layers as the encoder numbers them
    (the head and everything outside the encoder at the top), and weight decay where the optimiser
    rules put it."""
    encoder = model.method.encoder
    num_layers = encoder.num_layers
    no_decay = declared_no_decay(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        inside = name.startswith(ENCODER_PREFIX)
        layer = encoder.layer_id(name[len(ENCODER_PREFIX):]) if inside else num_layers
        decayed = decays(name, param, no_decay)
        group = groups.setdefault((layer, decayed), {
            "params": [], "weight_decay": weight_decay if decayed else 0.0,
            "lr_scale": decay ** (num_layers - layer), "lr": lr,
        })
        group["params"].append(param)
    return list(groups.values())


class SceneAugment:
    """The optical-scene training transform of one sample in [0, 1]: RandomResizedCrop (0.08-1,
    bicubic) + horizontal flip + RandAugment(2 ops, magnitude 9), normalisation, RandomErasing."""

    def __init__(self, size: int, norm: Normalisation, erase_prob: float) -> None:
        self.before = v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(), v2.RandAugment(num_ops=2, magnitude=9)])
        self.norm = norm
        self.erase = v2.RandomErasing(p=erase_prob, value="random") if erase_prob > 0 else None

    def __call__(self, x: Tensor) -> Tensor:
        x = self.norm(self.before(x).clamp(0, 1))
        return self.erase(x) if self.erase else x


def mix_batch(images: dict[str, Tensor], labels: Tensor, mixer: Mixup) -> tuple[dict[str, Tensor], Tensor]:
    """timm's batch mixup / cutmix with its smoothed soft targets; all modalities share lambda and box."""
    names = list(images)
    stacked = torch.cat([images[m] for m in names], dim=1)
    mixed, targets = mixer(stacked, labels)
    parts = mixed.split([images[m].shape[1] for m in names], dim=1)
    return dict(zip(names, parts)), targets


class Recipe:
    """What a protocol does to a training batch (augmentation, mixing, normalisation) and its loss."""

    def __init__(self, protocol: FinetuneProtocol, norms: dict[str, Normalisation], size: int,
                 num_classes: int) -> None:
        self.protocol, self.norms = protocol, norms
        self.augment = {m: SceneAugment(size, n, protocol.erase_prob) for m, n in norms.items()} \
            if protocol.augment else None
        self.mixer = Mixup(mixup_alpha=protocol.mixup, cutmix_alpha=protocol.cutmix, label_smoothing=
                           protocol.label_smoothing, num_classes=num_classes) \
            if protocol.mixup > 0 or protocol.cutmix > 0 else None

    def inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.norms[m](x) for m, x in batch.items()}

    def train_batch(self, batch: dict[str, Tensor], labels: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        if self.augment:
            images = {m: torch.stack([self.augment[m](x) for x in xs]) for m, xs in batch.items()}
        else:
            images = self.inputs(batch)
        return mix_batch(images, labels, self.mixer) if self.mixer else (images, labels)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.protocol.multilabel:
            return F.multilabel_soft_margin_loss(logits, targets.float())
        if targets.ndim == 2:  # soft targets from mixup / cutmix (smoothing included)
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.protocol.label_smoothing)


def evaluation_epochs(epochs: int) -> list[int]:
    """Where the authors' fine-tuning evaluates: epoch 1, every 5th, and (here) the last."""
    return sorted({1, *reference_epochs(epochs)})


def on(device: torch.device, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {m: x.to(device, non_blocking=True) for m, x in batch.items()}


@torch.no_grad()
def logits_of(model: Classifier, loader: DataLoader, recipe: Recipe) -> Tensor:
    model.eval()
    device = module_device(model)
    return torch.cat([model(on(device, recipe.inputs(batch))).float().cpu() for batch, _ in loader])


def finetune_once(model: Classifier, train: DataLoader, val: DataLoader | None, test: DataLoader,
                  recipe: Recipe, seed: int) -> dict[int, tuple[Tensor | None, Tensor]]:
    """Train ``model`` end to end; return the (validation, test) logits at each evaluation epoch.
    The test labels are not looked at here."""
    protocol = recipe.protocol
    torch.manual_seed(seed)  # shuffling, drop path, RandAugment, RandomErasing
    np.random.seed(seed)  # timm's mixup / cutmix draws
    lr = protocol.base_lr * train.batch_size / 256
    optimizer = torch.optim.AdamW(layer_decay_groups(model, lr, protocol.weight_decay, protocol.layer_decay),
                                  betas=(0.9, 0.999))
    steps_per_epoch = len(train)
    total, warmup, step = protocol.epochs * steps_per_epoch, protocol.warmup_epochs * steps_per_epoch, 0
    evaluations, wanted = {}, set(evaluation_epochs(protocol.epochs))
    device = module_device(model)
    for epoch in range(1, protocol.epochs + 1):
        model.train()
        for batch, labels in train:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, lr, warmup, total, protocol.min_lr) * group["lr_scale"]
            images, targets = recipe.train_batch(batch, labels)
            images, targets = on(device, images), targets.to(device)
            loss = recipe.loss(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        if epoch in wanted:
            evaluations[epoch] = (logits_of(model, val, recipe) if val else None, logits_of(model, test, recipe))
    return evaluations


def seed_result(evaluations: dict[int, tuple[Tensor | None, Tensor]], val_labels: Tensor, test_labels: Tensor,
                multilabel: bool, key: str) -> dict[str, float]:
    """Honest (val-selected or last epoch) and reference (best test evaluation) scores of one seed."""
    last = max(evaluations)
    if evaluations[last][0] is not None:
        chosen = max(evaluations, key=lambda e: score(evaluations[e][0], val_labels, multilabel))
    else:
        chosen = last
    reference = max(score(test, test_labels, multilabel) for _, test in evaluations.values())
    honest = metrics(evaluations[chosen][1], test_labels, multilabel)
    main = next(iter(honest))
    return {key: honest[main], REFERENCE_KEY: reference,
            **{f"honest {k}": v for k, v in honest.items() if k != main}}


class WithLabels(torch.utils.data.Dataset):
    """Evaluation images paired with their labels."""

    def __init__(self, images: EvalImages, labels: np.ndarray) -> None:
        self.images, self.labels = images, torch.as_tensor(labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], Tensor]:
        return self.images[i], self.labels[i]


def unit_norms(data: LabelledSet, modalities: tuple[str, ...]) -> dict[str, Normalisation]:
    """Identity normalisation: images are cached in [0, 1] and normalised per batch."""
    channels = data.source.load(0)
    return {m: Normalisation([0.0] * channels[m].shape[2], [1.0] * channels[m].shape[2]) for m in modalities}


def run_finetune(load: Callable[[int], PretrainMethod], data: LabelledSet, split: Split, modality: str, shots: int,
                 mode: str, seeds: list[int], protocol: FinetuneProtocol) -> dict:
    """``load(seed)`` returns a fresh method (with the protocol's drop path) for every seed: the pretrained one,
    or one initialised from that seed (an encoder from scratch: each seed its own initialisation)."""
    if data.multilabel != protocol.multilabel:
        raise ConfigError("multi-label data needs --protocol multilabel" if data.multilabel else
                          "--protocol multilabel needs multi-label data (--labels with ';', --masks, or "
                          "--data synthetic --multilabel)")
    mods = MODALITY_SETS[modality]
    if protocol.augment and len(mods) > 1:
        raise ConfigError("--protocol optical-scene augments one modality (the published RGB recipe); "
                          "use --modality opt or sar")
    size = input_size(load(seeds[0]))
    images = WithLabels(EvalImages(data, mods, size, unit_norms(data, mods), protocol.centre_crop), data.labels)
    cached = [images[i] for i in range(len(images))]  # decode once, reuse for every seed
    recipe = Recipe(protocol, eval_norms(data, mods, split.train), size, len(data.classes))
    test = DataLoader(Subset(cached, split.test.tolist()), batch_size=100)
    val = DataLoader(Subset(cached, split.val.tolist()), batch_size=100) if len(split.val) else None
    labels = torch.as_tensor(data.labels)
    honest, per_seed = honest_key(split), []
    for seed in seeds:
        train_idx = training_indices(data, split.train, shots, mode, seed)
        batch = min(protocol.batch_size, len(train_idx))
        batch -= batch % 2 if recipe.mixer else 0  # timm's batch mixing pairs samples
        train = DataLoader(Subset(cached, train_idx.tolist()), batch_size=batch, shuffle=True, drop_last=True,
                           generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)  # the model's and head's initialisation: a seed's own, whatever ran before
        method = load(seed)
        model = Classifier(method, mods, len(data.classes), protocol.bn_head).to(module_device(method))
        start = time.perf_counter()
        evaluations = finetune_once(model, train, val, test, recipe, seed)
        per_seed.append(seed_result(evaluations, labels[split.val], labels[split.test], data.multilabel, honest))
        print(f"seed {seed}: honest {per_seed[-1][honest]:.2f}, reference "
              f"{per_seed[-1][REFERENCE_KEY]:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"metric": "micro mAP" if data.multilabel else "overall accuracy", "summary": summarise(per_seed),
            "split": split.as_json(), "train_size": len(train_idx), "val_size": len(split.val),
            "test_size": len(split.test), "epochs": protocol.epochs, "protocol": protocol.__dict__}
