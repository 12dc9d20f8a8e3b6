"""WebDataset shards: writing, decoding, per-rank/worker coverage, resume, corruption, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from codemae.cli import main
from codemae.config import load_config
from codemae.data.shard_writer import write_shards
from codemae.data.shards import decode_record, iter_records, read_manifest
from codemae.data.sources import FolderSource
from conftest import stream_of, tiny_config, write_pairs


def shard_set(tmp_path: Path, pairs: int = 48, per_shard: int = 12, sar_only: int = 0) -> tuple[Path, list]:
    """Shards of a generated paired folder (and an unpaired SAR folder); returns (folder, sources)."""
    sources = [{"name": "pairs", "kind": "paired", "root": str(write_pairs(tmp_path / "pairs", n=pairs, size=20))}]
    if sar_only:
        write_pairs(tmp_path / "more", n=sar_only, size=20)
        sources.append({"name": "sar", "kind": "sar", "root": str(tmp_path / "more" / "sar")})
    cfg = tiny_config(tmp_path / "run", data={"sources": sources})
    write_shards(cfg.data, cfg.model.channels, tmp_path / "shards", per_shard)
    return tmp_path / "shards", sources


def stream_cfg(tmp_path: Path, shards: Path, **data):
    return tiny_config(tmp_path / "train", data={"sources": [{"layout": "shards", "root": str(shards)}],
                                                 "batch_size": 4, "shuffle_buffer": 5, **data})


def epoch_ids(stream, epoch: int = 0, workers: int = 0) -> list[list[tuple[int, int]]]:
    stream.set_epoch(epoch)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [[tuple(i) for i in batch["id"].tolist()] for batch in loader]


def test_manifest_counts_checksums_and_lossless_records(tmp_path):
    shards, sources = shard_set(tmp_path, pairs=30, per_shard=12)
    (source,) = read_manifest(str(shards))
    assert (source.kind, source.samples, [s.samples for s in source.shards]) == ("paired", 30, [12, 12, 6])
    assert main(["data", "check", str(shard_config_file(tmp_path, shards)), "--pixels"]) == 0
    folder = FolderSource(load_config(None, [f"data.sources=[{{name: p, root: {sources[0]['root']}}}]"])
                          .data.sources[0], {"opt": 3, "sar": 1})
    records = list(iter_records(str(shards / source.shards[0].path)))
    for record in records[:3]:
        arrays = decode_record(record, source, {"opt": 3, "sar": 1}, "shard")
        expected = folder.load(int(record["__key__"]))
        assert all(np.array_equal(arrays[m], expected[m]) for m in ("opt", "sar"))


def shard_config_file(tmp_path: Path, shards: Path) -> Path:
    path = tmp_path / "shards.yaml"
    path.write_text(f"data:\n  sources:\n    - {{layout: shards, root: {shards}}}\n")
    return path


def test_two_ranks_cover_each_sample_once_per_epoch(tmp_path):
    shards, _ = shard_set(tmp_path, pairs=96, per_shard=12)
    cfg = stream_cfg(tmp_path, shards)
    ranks = [stream_of(cfg, world_size=2, rank=r) for r in range(2)]
    for epoch in range(2):
        seen = [epoch_ids(stream, epoch) for stream in ranks]
        assert len(seen[0]) == len(seen[1]) == len(ranks[0]) == 12
        flat = [i for rank in seen for batch in rank for i in batch]
        assert len(flat) == len(set(flat)) == 96  # no duplicates, none missing
        assert {i for _, i in flat} == set(range(96))
    assert epoch_ids(ranks[0], 0) == epoch_ids(ranks[0], 0) != epoch_ids(ranks[0], 1)  # reshuffled per epoch


def test_loader_workers_split_shards_and_resume_mid_epoch(tmp_path):
    shards, _ = shard_set(tmp_path, pairs=48, per_shard=6)
    cfg = stream_cfg(tmp_path, shards, num_workers=2)
    stream = stream_of(cfg)
    full = epoch_ids(stream, 0, workers=2)
    flat = [i for batch in full for i in batch]
    assert len(full) == len(stream) == 12 and len(set(flat)) == len(flat) == 48
    stream.set_epoch(0, start=5)
    resumed = [[tuple(i) for i in b["id"].tolist()] for b in DataLoader(stream, batch_size=None, num_workers=2)]
    assert resumed == full[5:]


def test_unpaired_and_paired_batches_stay_homogeneous_across_ranks(tmp_path):
    shards, _ = shard_set(tmp_path, pairs=32, per_shard=8, sar_only=40)
    cfg = stream_cfg(tmp_path, shards)
    ranks = [stream_of(cfg, world_size=2, rank=r) for r in range(2)]
    kinds = []
    for stream in ranks:
        stream.set_epoch(0)
        kinds.append([(b["opt"] is not None, b["sar"].shape[0]) for b in DataLoader(stream, batch_size=None)])
    assert kinds[0] == kinds[1] and {k for k in kinds[0]} == {(True, 4), (False, 4)}


def test_pretraining_reads_shards(tmp_path):
    shards, _ = shard_set(tmp_path, pairs=24, per_shard=6, sar_only=12)
    from codemae.train.engine import pretrain

    summary = pretrain(stream_cfg(tmp_path, shards))
    assert summary["step"] == 2 * (24 // 4 + 12 // 4) and summary["ranks_in_sync"]


def test_shards_stream_from_a_url(tmp_path):
    """Any URL WebDataset opens: here ``pipe:cat <folder>`` (the manifest and every shard through a pipe)."""
    shards, _ = shard_set(tmp_path, pairs=24, per_shard=6)
    local = stream_cfg(tmp_path, shards)
    piped = stream_cfg(tmp_path, shards)
    piped.data.sources[0].root = f"pipe:cat {shards}"
    a = stream_of(local)
    b = stream_of(piped)
    assert epoch_ids(a) == epoch_ids(b) and len({i for batch in epoch_ids(b) for i in batch}) == 24
