"""``codemae shard``: folder sources written as WebDataset tar shards plus a manifest (see
:mod:`codemae.data.shards` for the layout and the reader)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from codemae.config import DataConfig, to_dict
from codemae.data.shards import FORMAT, MANIFEST, Shard, sha256
from codemae.data.sources import FolderSource
from codemae.data.stats import source_stats
from codemae.errors import DataError

log = logging.getLogger(__name__)


def write_shards(data: DataConfig, channels: dict[str, int], out: Path, samples_per_shard: int) -> Path:
    """Shard every folder source of ``data`` into ``out``, with its statistics (given, from a file, or
    computed over ``data.stats_samples`` samples); return the manifest's path."""
    from webdataset import TarWriter

    entries = []
    for source_cfg in data.sources:
        if source_cfg.kind == "synthetic" or source_cfg.layout == "shards":
            raise DataError(f"source '{source_cfg.name}': only folder sources can be sharded")
        source = FolderSource(source_cfg, channels, data.root)
        stats = source_stats(source, source_cfg, out / "stats" / f"{source.name}.json", data.stats_samples, True)
        folder = out / source.name
        folder.mkdir(parents=True, exist_ok=True)
        shards = []
        for start in range(0, len(source), samples_per_shard):
            path = folder / f"shard-{start // samples_per_shard:06d}.tar"
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            indices = range(start, min(start + samples_per_shard, len(source)))
            with tmp.open("wb") as f, TarWriter(f, encoder=False) as writer:
                for i in indices:
                    writer.write(record_of(source, i))
            os.replace(tmp, path)
            shards.append(Shard(str(path.relative_to(out)), len(indices), path.stat().st_size, sha256(path)))
        kept = dataclasses.replace(source_cfg, root="", split=None, split_csv=None, splits=[], exclude=[])
        entries.append({"name": source.name, "kind": source_cfg.kind, "modalities": list(source.modalities),
                        "samples": len(source), "source": to_dict(kept),
                        "stats": {m: dataclasses.asdict(s) for m, s in stats.items()},
                        "shards": [dataclasses.asdict(s) for s in shards]})
        log.info("source '%s': %d samples in %d shards", source.name, len(source), len(shards))
    manifest = out / MANIFEST
    tmp = manifest.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"format": FORMAT, "version": 1, "sources": entries}, indent=1) + "\n")
    os.replace(tmp, manifest)
    return manifest


def record_of(source: FolderSource, index: int) -> dict[str, bytes | str]:
    """One sample as a WebDataset record: the original file bytes, plus the tile box when tiled."""
    file, top, left = source.tiles[index]
    record: dict[str, bytes | str] = {"__key__": f"{index:09d}"}
    for m, path in source.files[file].items():
        record[f"{m}{path.suffix.lower()}"] = path.read_bytes()
    if source.cfg.tile:
        record["json"] = json.dumps({"stem": source.stems[index], "tile": [top, left, source.cfg.tile]}).encode()
    return record
