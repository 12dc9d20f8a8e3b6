"""Faults during training: crashes (also mid-checkpoint), dead ranks, NaN losses, full disks, hostile checkpoints."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from codemae.errors import DataError, TrainingError
from codemae.methods.mae import JointMAE
from codemae.checkpoint import load_checkpoint, save_atomic
from codemae.train.engine import pretrain
from conftest import REPO, PicklePayload, run_cli, tiny_config, write_config
from test_scale import node_launchers

STEPS = ["train.epochs=20", "train.ckpt_every=1"]  # 80 steps of 4 synthetic pairs


def final_weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """Final weights of the uninterrupted run every crashed run must reproduce."""
    config = write_config(tmp_path_factory.mktemp("straight") / "c.yaml")
    proc = run_cli(config, *STEPS)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    return final_weights(config.parent / "run")


def resume_and_compare(config: Path, straight: dict, stopped_at: int) -> None:
    resumed = run_cli(config, *STEPS)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"at step {stopped_at}" in out
    ours = final_weights(config.parent / "run")
    assert ours.keys() == straight.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], straight[key], rtol=1e-6, atol=1e-7, msg=key)
    rows = (config.parent / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 80  # no duplicated or missing log rows across the crash


def test_killed_run_resumes_to_the_same_parameters(tmp_path, straight):
    """SIGKILL at a step the timing picks, then automatic resume to the same parameters."""
    config = write_config(tmp_path / "c.yaml")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    proc = run_cli(config, *STEPS)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and load_checkpoint(ckpt)["step"] >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = load_checkpoint(ckpt)["step"]
    assert 5 <= stopped_at < 80
    resume_and_compare(config, straight, stopped_at)


DIE_IN_SAVE = """
import os, signal, sys, torch
real, calls = torch.save, [0]
def dying(obj, f):
    calls[0] += 1
    if calls[0] == {kill_at}:  # half-written, then SIGKILL: a crash in the middle of a checkpoint write
        f.write(b"half a checkpoint"); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
    real(obj, f)
torch.save = dying
from codemae.cli import main
sys.exit(main(["pretrain", "--config", sys.argv[1], *sys.argv[2:]]))
"""


def test_kill_during_checkpoint_write_keeps_the_last_complete_one(tmp_path, straight):
    kill_at = int(np.random.default_rng(7).integers(3, 30))  # a random checkpoint write of the run
    config = write_config(tmp_path / "c.yaml")
    proc = subprocess.run([sys.executable, "-c", DIE_IN_SAVE.format(kill_at=kill_at), str(config), *STEPS],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in folder.glob(".last.pt.tmp-*")]  # the half-written file never replaced last.pt
    assert load_checkpoint(folder / "last.pt")["step"] == kill_at - 1
    resume_and_compare(config, straight, kill_at - 1)
    assert not list(folder.glob(".last.pt.tmp-*"))  # the stale temp file was cleaned up on resume


def test_a_dead_rank_stops_the_other_node_with_a_clear_message(tmp_path):
    config = write_config(tmp_path / "c.yaml", data={"batch_size": 2}, train={"epochs": 500, "ckpt_every": 1})
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    launchers = node_launchers(config)
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpt.exists() and load_checkpoint(ckpt)["step"] >= 2):
        time.sleep(0.1)
    worker = next(pid for pid in children(launchers[1].pid) if b"codemae.cli" in cmdline(pid))
    os.kill(worker, signal.SIGKILL)
    start = time.time()
    outs = [p.communicate(timeout=120)[0] for p in launchers]
    assert time.time() - start < 120 and all(p.returncode != 0 for p in launchers)
    assert "another process of the run failed or stopped answering" in outs[0], outs[0][-2000:]
    assert "relaunch to resume" in outs[0]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def test_checkpoint_atomic_and_refuses_pickled_code(tmp_path):
    path = tmp_path / "ck.pt"
    save_atomic({"model": {"w": torch.ones(2)}, "step": 3}, path)
    assert load_checkpoint(path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind
    evil = tmp_path / "evil.pt"
    torch.save({"model": PicklePayload(tmp_path / "pwned")}, evil)
    with pytest.raises(DataError, match="weights only"):
        load_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()


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


def nan_at_call(monkeypatch, call: int, term_value: float = float("nan")) -> None:
    calls = {"n": 0}
    real = JointMAE.forward

    def flaky(self, batch):
        calls["n"] += 1
        out = real(self, batch)
        return {"recon": out["recon"] * term_value} if calls["n"] == call else out

    monkeypatch.setattr(JointMAE, "forward", flaky)


def test_nan_loss_stops_and_names_the_term(tmp_path, monkeypatch):
    nan_at_call(monkeypatch, 4)
    cfg = tiny_config(tmp_path / "run", train={"ckpt_every": 2})
    with pytest.raises(TrainingError, match="'recon' = nan"):
        pretrain(cfg)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


def test_inf_loss_is_skipped_when_configured(tmp_path, monkeypatch, caplog):
    nan_at_call(monkeypatch, 3, float("inf"))
    summary = pretrain(tiny_config(tmp_path / "run", train={"on_nonfinite": "skip"}))
    assert summary["step"] == 8 and summary["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "run").values())
    assert "'recon' = inf at step 2; update skipped" in (tmp_path / "run" / "train.log").read_text()
