import json
import sys
from pathlib import Path

import pytest
import torch

from codemae.methods import build_method
from codemae.checkpoint import load_checkpoint
from codemae.train.engine import pretrain
from codemae.train.optim import lr_at, param_groups, scaled_lr

from conftest import run_cli, tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]


def test_lr_rule_and_schedule():
    assert scaled_lr(1.5e-4, 2048) == pytest.approx(1.2e-3)  # the paper's 8 GPUs x 128 pairs x 2 modalities
    assert lr_at(0, 1.0, 10, 100) == 0.0
    assert lr_at(5, 1.0, 10, 100) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 10, 100, min_lr=0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_norms_and_embeddings(tmp_path):
    model = build_method(tiny_config(tmp_path))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "encoder.pos_embed" in no_decay_names
    assert "decoders.shared.mask_token" in no_decay_names
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    assert any(n.endswith("norm.weight") for n in no_decay_names) and any(n.endswith("bias") for n in no_decay_names)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_two_process_torchrun_keeps_ranks_in_sync(tmp_path):
    config = write_config(tmp_path / "c.yaml", data={"batch_size": 2})
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m")
    proc = run_cli(config, "train.epochs=1", launcher=torchrun)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert summary["step"] == 16 // (2 * 2)  # 16 scenes, 2 pairs per rank, 2 ranks
    assert summary["effective_batch"] == 2 * 2 * 2


def test_load_method_from_checkpoint_gives_same_encoder(tmp_path):
    from codemae.loading import load_method

    cfg = tiny_config(tmp_path / "run", train={"max_steps": 2})
    pretrain(cfg)
    method = load_method(tmp_path / "run" / "checkpoints" / "last.pt")
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(v, saved[k]) for k, v in method.state_dict().items())
    assert not method.training
    tokens = method.encode({"sar": torch.randn(1, 1, 32, 32)})["sar"]
    assert tokens.shape == (1, 4, 32)
