"""Shared fixtures: tiny configs and generated image folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from codemae.config import Config, from_dict, to_dict

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """Path of a real-data folder in ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} is absent (expected ../shared/data beside the checkout)")
    return path


def tiny_config(run_dir: Path, **sections) -> Config:
    """A CPU-second-sized config: 32 px images, a 2-block HiViT, a 1-block decoder."""
    raw = {
        "run_dir": str(run_dir),
        "model": {"backbone": "hivit_tiny", "img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2},
        "method": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
        "data": {"batch_size": 4, "num_workers": 0, "stats_samples": 8,
                 "sources": [{"kind": "synthetic", "synthetic": {"num_scenes": 16, "image_size": 40}}]},
        "train": {"epochs": 2, "warmup_epochs": 1, "ckpt_every": 1000, "log_every": 1, "progress": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return from_dict(Config, raw)


def write_pairs(root: Path, n: int = 6, size: int = 40, sar_size: int | None = None) -> Path:
    """A paired folder (opt/*.png RGB, sar/*.png gray) with a tiles.csv split file."""
    rng = np.random.default_rng(0)
    (root / "opt").mkdir(parents=True)
    (root / "sar").mkdir()
    rows = ["tile,split"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "opt" / f"t{i}.png")
        s = sar_size or size
        Image.fromarray(rng.integers(0, 256, (s, s), dtype=np.uint8)).save(root / "sar" / f"t{i}.png")
        rows.append(f"t{i},{'train' if i < n - 2 else 'val'}")
    (root / "tiles.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def pairs_dir(tmp_path: Path) -> Path:
    return write_pairs(tmp_path / "pairs")


def write_config(path: Path, **sections) -> Path:
    """A tiny config as a YAML file, its run folder ``run`` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(tiny_config(path.parent / "run", **sections))))
    return path


def run_cli(config: Path, *extra: str, launcher: tuple[str, ...] = (sys.executable, "-m")) -> subprocess.Popen:
    """``codemae pretrain --config config extra...`` in a subprocess (optionally under a launcher)."""
    cmd = [*launcher, "codemae.cli", "pretrain", "--config", str(config), *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class PicklePayload:
    """Unpickling this creates ``path``: a checkpoint carrying it must be refused before that happens."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def stream_of(cfg: Config, world_size: int = 1, rank: int = 0):
    """The shard stream a training run of ``cfg`` reads, for rank ``rank`` of ``world_size``."""
    from codemae.data.shards import ShardStream, shard_sources

    return ShardStream(*shard_sources(cfg.data), cfg.data, cfg.model.geometry, cfg.seed, world_size, rank)
