"""Evaluation protocols: probe head/optimiser per spec, K-shot sampling, the 10% rule, retrieval
metrics on hand-built embeddings, the honest protocol's handling of test labels."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from codemae.cli import main
from codemae.config import to_dict
from codemae.eval import probe
from codemae.eval.data import k_shot, presence_labels, split_indices
from codemae.eval.knn import knn_accuracy
from codemae.eval.retrieval import retrieval_metrics

from conftest import tiny_config


def test_probe_head_and_optimiser_match_the_spec():
    torch.manual_seed(0)
    head = probe.build_head(512, 10)
    ln, bn, linear = head
    assert isinstance(ln, nn.LayerNorm) and ln.elementwise_affine
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert isinstance(linear, nn.Linear) and abs(linear.weight.std().item() - 0.01) < 0.001
    assert torch.equal(linear.bias, torch.zeros(10))
    opt = probe.probe_optimizer(head)
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.5, 0.9, 0.0)
    assert (probe.EPOCHS, probe.BATCH) == (50, 256)
    assert probe.cosine_lr(0, 100) == 0.5 and probe.cosine_lr(100, 100) == pytest.approx(1e-6)


def test_k_shot_counts_and_seeds():
    labels = np.repeat(np.arange(4), 30)
    pool = np.arange(120)
    a = k_shot(pool, labels, 10, "balanced", 4, seed=0)
    assert np.bincount(labels[a]).tolist() == [10, 10, 10, 10]
    b = k_shot(pool, labels, 10, "balanced", 4, seed=1)
    assert not np.array_equal(a, b)
    r = k_shot(pool, labels, 10, "random", 4, seed=0)
    assert len(r) == 40 and len(set(r)) == 40
    assert not np.array_equal(r, k_shot(pool, labels, 10, "random", 4, seed=1))


def test_split_is_disjoint_and_stratified():
    labels = np.repeat(np.arange(3), 20)
    split = split_indices(labels, {"pool": 0.6, "val": 0.2, "test": 0.2})
    allidx = np.concatenate(list(split.values()))
    assert len(allidx) == 60 and len(set(allidx)) == 60
    assert np.bincount(labels[split["test"]]).tolist() == [4, 4, 4]


def test_ten_percent_rule_on_hand_made_mask():
    mask = np.zeros((10, 10), dtype=np.int64)
    mask[:, :5] = 1          # 50%
    mask[0, :9] = 2          # 9%: absent
    mask[1:3, 5:10] = 3      # 10%: present
    mask[9, 9] = -1          # no data, ignored
    assert presence_labels(mask, 4, ignore_index=-1).tolist() == [1.0, 1.0, 0.0, 1.0]


def test_retrieval_metrics_on_hand_built_embeddings():
    eye = torch.eye(8)
    perfect = retrieval_metrics(eye, eye)
    assert perfect["opt->sar R@1"] == 100 and perfect["sar->opt median rank"] == 1
    shifted = retrieval_metrics(eye, eye.roll(1, dims=0))  # every true match beaten by exactly one item
    assert shifted["opt->sar R@1"] == 0 and shifted["opt->sar R@5"] == 100
    assert shifted["opt->sar median rank"] == 2 and shifted["sar->opt R@1"] == 0


def test_knn_on_separable_clusters():
    torch.manual_seed(0)
    centres = torch.randn(3, 16) * 5
    y = torch.arange(3).repeat_interleave(20)
    x = centres[y] + torch.randn(60, 16) * 0.1
    assert knn_accuracy(x[::2], y[::2], x[1::2], y[1::2], 3, k=5) == 100.0


def test_honest_protocol_reads_test_labels_only_after_training(monkeypatch):
    steps = {"n": 0}
    real_step = torch.optim.SGD.step

    def counting_step(self, *a, **k):
        steps["n"] += 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)
    torch.manual_seed(0)
    x, y = torch.randn(60, 8), torch.arange(3).repeat(20)
    reads = []

    def poisoned_test_labels():
        reads.append(steps["n"])
        return y[:20]

    result = probe.train_probe(x, y, x[:20], y[:20], x[:20], poisoned_test_labels, 3, False, seed=0, epochs=4, batch=16)
    assert reads == [4 * 4]  # once, after all 4 epochs x 4 steps
    assert 1 <= result.honest_epoch <= 4 and result.reference >= result.honest


def test_probe_cli_on_synthetic_with_random_encoder(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path / "run"))))
    out = tmp_path / "probe.json"
    code = main(["probe", "--random", str(config), "--data", "synthetic", "--synthetic-n", "60", "--synthetic-size",
                 "40", "--modality", "both", "--shots", "0", "--seeds", "2", "--epochs", "3", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert set(summary) == {"honest (val-selected, test once)", "reference (best of test evaluations every 5 epochs)",
                            "honest weighted precision", "honest weighted recall", "honest weighted F1"}
    assert result["split"]["kind"] == "re-split"
    assert len(summary["honest (val-selected, test once)"]["values"]) == 2
    assert "linear probe (codemae-linear), both" in capsys.readouterr().out
    assert main(["probe", "--random", str(config), "--data", str(tmp_path), "--modality", "both"]) == 2


def test_seeds_split_over_runs_merge_into_the_one_run_result(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path / "run"))))

    def probe_run(name: str, *seeds: str) -> Path:
        out = tmp_path / name
        assert main(["probe", "--random", str(config), "--data", "synthetic", "--synthetic-n", "60",
                     "--synthetic-size", "40", "--modality", "sar", "--kshot", "random", "--shots", "2",
                     "--epochs", "3", *seeds, "--out", str(out)]) == 0
        return out

    whole = json.loads(probe_run("whole.json", "--seeds", "3").read_text())
    assert whole["seeds"] == [0, 1, 2]
    later = probe_run("later.json", "--seeds", "2", "--first-seed", "1")
    first = probe_run("first.json", "--seeds", "1")
    merged_out = tmp_path / "merged.json"
    assert main(["merge", str(later), str(first), "--out", str(merged_out)]) == 0
    merged = json.loads(merged_out.read_text())
    assert merged["seeds"] == [0, 1, 2] and merged["merged_from"] == [str(later), str(first)]
    for key, s in whole["summary"].items():  # the same seeds give the same per-seed results, in seed order
        assert merged["summary"][key]["values"] == pytest.approx(s["values"])
        assert merged["summary"][key]["mean"] == pytest.approx(s["mean"])
        assert merged["summary"][key]["std"] == pytest.approx(s["std"])
    assert len(set(whole["summary"]["honest (val-selected, test once)"]["values"])) > 1  # the seeds differ
    capsys.readouterr()

    assert main(["merge", str(later), str(tmp_path / "whole.json"), "--out", str(tmp_path / "m.json")]) == 2
    assert "seed 1 is in" in capsys.readouterr().err
    other = json.loads(first.read_text()) | {"command": ["probe", "--shots", "10", "--seeds", "1"]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["merge", str(later), str(tmp_path / "other.json"), "--out", str(tmp_path / "m.json")]) == 2
    assert "another evaluation than" in capsys.readouterr().err
    assert main(["merge", str(later), str(tmp_path / "missing.json"), "--out", str(tmp_path / "m.json")]) == 2
    assert "missing.json: cannot read a JSON result" in capsys.readouterr().err


def test_evaluation_of_drops_only_the_seed_and_output_options():
    from codemae.eval.report import evaluation_of

    assert evaluation_of(["finetune", "--cnn", "64", "--seeds", "2", "--first-seed", "3", "--out", "a.json",
                          "--shots", "40"]) == ["finetune", "--cnn", "64", "--shots", "40"]
    assert evaluation_of(["probe", "--seeds=2", "--out=x.json", "--epochs", "3"]) == ["probe", "--epochs", "3"]
