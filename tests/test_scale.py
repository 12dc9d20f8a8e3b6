"""Scale-out paths: two torchrun launchers on loopback (2 nodes x 1 process) on shards, encoder export."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import codemae
from codemae.config import to_dict
from codemae.errors import DataError
from codemae.export import load_export_method
from codemae.loading import load_method
from codemae.train.engine import pretrain
from conftest import tiny_config
from test_shards import shard_set

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_launchers(config: Path, nodes: int = 2) -> list[subprocess.Popen]:
    """One torchrun per node, 1 process each, static rendezvous on 127.0.0.1."""
    port = free_port()
    procs = []
    for node in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc-per-node=1",
               f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
               "-m", "codemae.cli", "pretrain", "--config", str(config)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def test_two_nodes_on_loopback_train_on_shards(tmp_path):
    shards, _ = shard_set(tmp_path, pairs=32, per_shard=4)
    cfg = tiny_config(tmp_path / "run", data={"sources": [{"layout": "shards", "root": str(shards)}],
                                              "batch_size": 2, "num_workers": 1},
                      train={"epochs": 1, "max_steps": 4})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    procs = node_launchers(config)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["world_size"], summary["step"], summary["ranks_in_sync"]) == (2, 4, True)
    assert summary["effective_batch"] == 2 * 2 * 2


def test_export_gives_the_checkpoints_features_and_refuses_pickle(tmp_path):
    from codemae.cli import main

    pretrain(tiny_config(tmp_path / "run", method={"name": "codemae", "ccl": "cross_attention", "cdr": True,
                                                   "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
                         train={"max_steps": 2}))
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "enc")]) == 0
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["README.md", "config.json", "encoder.safetensors"]
    exported, original = load_export_method(tmp_path / "enc"), load_method(ckpt)
    images = {"opt": torch.randn(2, 3, 32, 32), "sar": torch.randn(2, 1, 32, 32)}
    with torch.no_grad():
        a, b = exported.encode(images), original.encode(images)
    assert all(torch.equal(a[m], b[m]) for m in images)
    assert (tmp_path / "enc" / "encoder.safetensors").stat().st_size < ckpt.stat().st_size / 2  # no optimiser

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    torch.save({"x": Payload()}, tmp_path / "enc" / "encoder.safetensors")
    with pytest.raises(DataError, match="not a safetensors file"):
        codemae.load_encoder(str(tmp_path / "enc"))
    assert not (tmp_path / "pwned").exists()


def test_fusmae_export_carries_its_fusion_weights(tmp_path):
    pretrain(tiny_config(tmp_path / "run", model={"backbone": "vit_tiny", "img_size": 32, "embed_dim": 32,
                                                  "depth": 2, "num_heads": 2},
                         method={"name": "fusmae", "fusion": "xaed", "masking": "independent", "decoder_dim": 32,
                                 "decoder_depth": 1, "decoder_heads": 2}, train={"max_steps": 1}))
    from codemae.export import export_encoder

    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    exported = load_export_method(export_encoder(ckpt, tmp_path / "enc"))
    images = {"opt": torch.randn(2, 3, 32, 32), "sar": torch.randn(2, 1, 32, 32)}
    with torch.no_grad():
        assert torch.equal(exported.encode(images)["opt"], load_method(ckpt).encode(images)["opt"])


def test_bench_reports_split_step_and_pipeline(tmp_path, capsys):
    from codemae.bench import STEP_COLUMNS, run_bench

    result = run_bench(["vit_tiny"], 32, 2, 1, None, str(tmp_path / "b.json"), workers=0)
    (row,) = result["steps"]
    parts = sum(row[f"{k}_s"] for k in ("data", "forward", "backward", "optimizer"))
    assert parts == pytest.approx(row["step_s"], abs=2e-3) and row["data_s"] >= 0
    assert 0 < row["utilisation"] and row["pairs_per_s"] == pytest.approx(2 / row["step_s"], rel=0.01, abs=0.005)  # rounded to 0.01
    assert set(result["pipeline_pairs_per_s"]) == {0, 1, 2} and all(v > 0 for v in result["pipeline_pairs_per_s"].values())
    out = capsys.readouterr().out
    assert " | ".join(STEP_COLUMNS) in out and "data pipeline alone" in out
    assert json.loads((tmp_path / "b.json").read_text())["steps"][0]["backbone"] == "vit_tiny"
