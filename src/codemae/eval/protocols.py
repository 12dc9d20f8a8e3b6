"""Protocol runners: extract frozen features once per split, repeat per seed.

The split (:mod:`codemae.eval.splits`) is the dataset's own (given folders or split lists) or
the fallback stratified 60/20/20 re-split; each evaluation seed draws its own K-shot (or
label-fraction) training set from the training part.
"""

from __future__ import annotations

import numpy as np
import torch

from codemae.config import SourceConfig, SyntheticConfig
from codemae.data.sources import FolderSource, Source, SyntheticSource
from codemae.errors import ConfigError, DataError
from codemae.eval.data import EvalImages, LabelledSet, k_shot
from codemae.eval.features import MODALITY_SETS, eval_norms, extract_features, input_size
from codemae.eval.knn import knn_accuracy
from codemae.eval.probe import RECIPES, ProbeRecipe, train_probe
from codemae.eval.report import summarise
from codemae.eval.retrieval import retrieval_metrics
from codemae.eval.splits import Split
from codemae.methods import PretrainMethod

REFERENCE_KEY = "reference (best of test evaluations every 5 epochs)"


def honest_key(split: Split) -> str:
    return "honest (val-selected, test once)" if len(split.val) else "honest (last epoch, test once)"


def training_indices(data: LabelledSet, pool: np.ndarray, shots: int, mode: str, seed: int,
                     label_fraction: float | None = None) -> np.ndarray:
    """The seed's training samples: the whole pool (``shots`` 0), a K-shot draw, or a random fraction."""
    if label_fraction is not None:
        n = max(2, int(len(pool) * label_fraction))
        if n > len(pool):
            raise DataError(f"a {label_fraction:g} label fraction needs 2 training samples; the pool has {len(pool)}")
        return np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False))
    return pool if shots <= 0 else k_shot(pool, data.labels, shots, mode, len(data.classes), seed)


def frozen_features(method: PretrainMethod, data: LabelledSet, split: Split, modality: str,
                    centre_crop: int | None) -> torch.Tensor:
    mods = MODALITY_SETS[modality]
    images = EvalImages(data, mods, input_size(method), eval_norms(data, mods, split.train), centre_crop)
    return extract_features(method, images)


def run_probe(method: PretrainMethod, data: LabelledSet, split: Split, modality: str, shots: int, mode: str,
              seeds: list[int], centre_crop: int | None = None, epochs: int | None = None,
              recipe: ProbeRecipe = RECIPES["codemae-linear"]) -> dict:
    feats = frozen_features(method, data, split, modality, centre_crop)
    labels = torch.from_numpy(data.labels)
    per_seed = []
    for seed in seeds:
        train = training_indices(data, split.train, shots, mode, seed, recipe.label_fraction)
        result = train_probe(feats[train], labels[train], feats[split.val], labels[split.val],
                             feats[split.test], lambda: labels[split.test], len(data.classes),
                             data.multilabel, seed, epochs=epochs, recipe=recipe)
        extra = {f"honest {k}": v for k, v in list(result.honest_metrics.items())[1:]}
        per_seed.append({honest_key(split): result.honest, REFERENCE_KEY: result.reference, **extra})
    return {"metric": "micro mAP" if data.multilabel else "overall accuracy", "summary": summarise(per_seed),
            "split": split.as_json(), "train_size": len(train), "val_size": len(split.val),
            "test_size": len(split.test)}


def run_knn(method: PretrainMethod, data: LabelledSet, split: Split, modality: str, shots: int, mode: str,
            seeds: list[int], k: int = 20, centre_crop: int | None = None) -> dict:
    if data.multilabel:
        raise ConfigError("k-NN votes for one class per sample; multi-label data needs probe or finetune")
    feats = frozen_features(method, data, split, modality, centre_crop)
    labels = torch.from_numpy(data.labels)
    per_seed = []
    for seed in seeds:
        train = training_indices(data, split.train, shots, mode, seed)
        acc = knn_accuracy(feats[train], labels[train], feats[split.test], labels[split.test],
                           len(data.classes), k)
        per_seed.append({f"{k}-NN accuracy": acc})
    return {"summary": summarise(per_seed), "split": split.as_json(), "train_size": len(train),
            "test_size": len(split.test)}


def paired_source(root: str, split: str | None, channels: dict[str, int], synthetic_n: int = 200) -> Source:
    """A paired folder (optionally one split), or ``synthetic``: generated scenes unseen in pretraining."""
    if root == "synthetic":
        return SyntheticSource(SourceConfig(kind="synthetic", seed=300_000,
                                            synthetic=SyntheticConfig(num_scenes=synthetic_n, image_size=96)), channels)
    return FolderSource(SourceConfig(kind="paired", root=root, split=split), channels)


def run_retrieval(method: PretrainMethod, source: Source) -> dict:
    """Each modality encoded on its own (no fusion), pooled, matched by cosine similarity."""
    data = LabelledSet(source, np.zeros(len(source), dtype=np.int64), ["-"])
    everything = np.arange(len(source))
    norms = eval_norms(data, ("opt", "sar"), everything)
    feats = {m: extract_features(method, EvalImages(data, (m,), input_size(method), norms)) for m in ("opt", "sar")}
    return {"pairs": len(source), "metrics": retrieval_metrics(feats["opt"], feats["sar"])}
