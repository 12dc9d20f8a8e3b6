import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from codemae.config import to_dict
from codemae.errors import DataError, TrainingError
from codemae.methods import build_method
from codemae.methods.mae import JointMAE
from codemae.train.checkpoint import load_checkpoint, save_atomic
from codemae.train.engine import pretrain
from codemae.train.optim import lr_at, param_groups, scaled_lr

from conftest import tiny_config

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


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_atomic_and_refuses_pickled_code(tmp_path):
    path = tmp_path / "ck.pt"
    save_atomic({"model": {"w": torch.ones(2)}, "step": 3}, path)
    assert load_checkpoint(path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Payload()}, protocol=2))
    with pytest.raises(DataError, match="weights only"):
        load_checkpoint(evil)
    assert not (Path.cwd() / "pwned").exists()


def test_disk_full_during_save_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_atomic({"step": 1}, path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(TrainingError, match="No space left.*previous checkpoint is intact"):
        save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_nan_loss_stops_and_names_the_term(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = JointMAE.forward

    def flaky(self, batch):
        calls["n"] += 1
        out = real(self, batch)
        return {"recon": out["recon"] * float("nan")} if calls["n"] == 4 else out

    monkeypatch.setattr(JointMAE, "forward", flaky)
    cfg = tiny_config(tmp_path / "run", train={"ckpt_every": 2})
    with pytest.raises(TrainingError, match="'recon' = nan"):
        pretrain(cfg)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


def write_config(path: Path, **sections) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(tiny_config(path.parent / "run", **sections))))
    return path


def run_cli(config: Path, *extra: str, launcher: tuple[str, ...] = (sys.executable, "-m")) -> subprocess.Popen:
    cmd = [*launcher, "codemae.cli", "pretrain", "--config", str(config), *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def final_weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    """N steps straight == SIGKILL after some checkpointed steps + automatic resume to N."""
    steps = ["train.epochs=20", "train.ckpt_every=1"]
    straight = write_config(tmp_path / "a" / "c.yaml")
    assert run_cli(straight, "train.epochs=20").wait(timeout=300) == 0

    killed = write_config(tmp_path / "b" / "c.yaml")
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "last.pt"
    proc = run_cli(killed, *steps)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and load_checkpoint(ckpt)["step"] >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = load_checkpoint(ckpt)["step"]
    assert 5 <= stopped_at < 80
    resumed = run_cli(killed, *steps)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resumed from {ckpt} at step {stopped_at}" in out

    a, b = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    rows = (tmp_path / "b" / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 80  # no duplicated or missing log rows across the crash


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
    from codemae.methods import load_method

    cfg = tiny_config(tmp_path / "run", train={"max_steps": 2})
    pretrain(cfg)
    method = load_method(tmp_path / "run" / "checkpoints" / "last.pt")
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(v, saved[k]) for k, v in method.state_dict().items())
    assert not method.training
    tokens = method.encode({"sar": torch.randn(1, 1, 32, 32)})["sar"]
    assert tokens.shape == (1, 4, 32)
