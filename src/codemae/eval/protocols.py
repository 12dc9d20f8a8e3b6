"""Protocol runners: split the labelled data, extract frozen features once, repeat per seed.

Splits: a fixed stratified split (seed 0) of the labelled data into a training
pool (60%), a validation set (20%) and a test set (20%); each evaluation seed
draws its own K-shot training set from the pool.
"""

from __future__ import annotations

import numpy as np
import torch

from codemae.config import SourceConfig, SyntheticConfig
from codemae.data.sources import FolderSource, Source, SyntheticSource
from codemae.eval.data import EvalImages, LabelledSet, k_shot, split_indices
from codemae.eval.features import MODALITY_SETS, eval_norms, extract_features, input_size
from codemae.eval.knn import knn_accuracy
from codemae.eval.probe import train_probe
from codemae.eval.report import summarise
from codemae.eval.retrieval import retrieval_metrics
from codemae.methods import PretrainMethod

SPLIT = {"pool": 0.6, "val": 0.2, "test": 0.2}


def training_indices(data: LabelledSet, pool: np.ndarray, shots: int, mode: str, seed: int) -> np.ndarray:
    return pool if shots <= 0 else k_shot(pool, data.labels, shots, mode, len(data.classes), seed)


def frozen_features(method: PretrainMethod, data: LabelledSet, modality: str, centre_crop: int | None
                    ) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    split = split_indices(data.labels, SPLIT)
    mods = MODALITY_SETS[modality]
    images = EvalImages(data, mods, input_size(method), eval_norms(data, mods, split["pool"]), centre_crop)
    return extract_features(method, images), split


def run_probe(method: PretrainMethod, data: LabelledSet, modality: str, shots: int, mode: str, seeds: list[int],
              centre_crop: int | None = None, epochs: int = 50) -> dict:
    feats, split = frozen_features(method, data, modality, centre_crop)
    labels = torch.from_numpy(data.labels)
    per_seed = []
    for seed in seeds:
        train = training_indices(data, split["pool"], shots, mode, seed)
        result = train_probe(feats[train], labels[train], feats[split["val"]], labels[split["val"]],
                             feats[split["test"]], lambda: labels[split["test"]], len(data.classes),
                             data.multilabel, seed, epochs=epochs)
        per_seed.append({"honest (val-selected, test once)": result.honest,
                         "reference (best test epoch)": result.reference})
    return {"metric": "micro mAP" if data.multilabel else "overall accuracy", "summary": summarise(per_seed),
            "train_size": len(train), "val_size": len(split["val"]), "test_size": len(split["test"])}


def run_knn(method: PretrainMethod, data: LabelledSet, modality: str, shots: int, mode: str, seeds: list[int],
            k: int = 20, centre_crop: int | None = None) -> dict:
    feats, split = frozen_features(method, data, modality, centre_crop)
    labels = torch.from_numpy(data.labels)
    per_seed = []
    for seed in seeds:
        train = training_indices(data, split["pool"], shots, mode, seed)
        acc = knn_accuracy(feats[train], labels[train], feats[split["test"]], labels[split["test"]],
                           len(data.classes), k)
        per_seed.append({f"{k}-NN accuracy": acc})
    return {"summary": summarise(per_seed), "test_size": len(split["test"])}


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
