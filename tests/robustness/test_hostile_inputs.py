"""Hostile or broken inputs: each stops with exit code 2 and one line naming the file, key or folder at
fault, or (``data.on_error=skip``) is passed over and counted; none is silently trained on."""

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from codemae.cli import main
from codemae.config import load_config, to_dict
from codemae.errors import ConfigError, DataError
from conftest import stream_of, tiny_config, write_pairs
from test_shards import epoch_ids, shard_config_file, shard_set, stream_cfg


def run(tmp_path: Path, capsys, sources: list[dict] | None = None, overrides: tuple[str, ...] = (),
        **sections) -> tuple[int, str]:
    if sources is not None:
        sections["data"] = {"sources": sources}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path / "run", **sections))))
    code = main(["pretrain", "--config", str(config), "train.epochs=1", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def paired(root: Path, **extra) -> list[dict]:
    return [{"kind": "paired", "root": str(root), **extra}]


def test_split_csv_names_missing_file(tmp_path, capsys):
    root = write_pairs(tmp_path / "p", n=6)
    (root / "opt" / "t1.png").unlink()
    (root / "sar" / "t1.png").unlink()
    code, msg = run(tmp_path, capsys, paired(root, split="train"))
    assert code == 2 and "tiles.csv names 't1'" in msg


def replace_with(root: Path, stem: str, fmt: str) -> Path:
    """Swap the optical image ``stem`` for a file of format ``fmt`` (png, jpg, tif) and return its path."""
    (root / "opt" / f"{stem}.png").unlink()
    path = root / "opt" / f"{stem}.{fmt}"
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    if fmt == "tif":
        tifffile.imwrite(path, image)
    else:
        Image.fromarray(image).save(path)
    return path


@pytest.mark.parametrize("fmt,workers", [("png", 0), ("png", 1), ("jpg", 0), ("tif", 0)])
def test_truncated_image(tmp_path, capsys, fmt, workers):
    root = write_pairs(tmp_path / "p", n=8)
    bad = replace_with(root, "t3", fmt)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    # stats=none: the error must come from the training loader (and its worker), not the stats pass
    code, msg = run(tmp_path, capsys, paired(root, stats="none"), overrides=(f"data.num_workers={workers}",))
    assert code == 2 and str(bad) in msg and ("truncated" in msg or "corrupt" in msg)


def test_zero_byte_file(tmp_path, capsys):
    root = write_pairs(tmp_path / "p", n=8)
    (root / "sar" / "t2.png").write_bytes(b"")
    code, msg = run(tmp_path, capsys, paired(root))
    assert code == 2 and f"{root / 'sar' / 't2.png'}: empty file (0 bytes)" in msg


def test_16_bit_where_8_bit_expected(tmp_path, capsys):
    root = write_pairs(tmp_path / "p", n=8)
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(root / "sar" / "t4.png")
    code, msg = run(tmp_path, capsys, paired(root, sar_scaling={"dtype": "uint8"}))
    assert code == 2 and "t4.png: pixels are uint16 but the source's scaling expects uint8" in msg


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_pixels_in_a_float_geotiff(tmp_path, capsys, value):
    root = write_pairs(tmp_path / "p", n=8)
    sar = np.full((40, 40), -12.0, np.float32)
    sar[5, 7] = value
    (root / "sar" / "t1.png").unlink()
    tifffile.imwrite(root / "sar" / "t1.tif", sar)
    code, msg = run(tmp_path, capsys, paired(root, sar_scaling={"mode": "db"}))
    assert code == 2 and "t1.tif: contains NaN or infinite pixel values" in msg


def test_decompression_bomb(tmp_path, capsys):
    root = write_pairs(tmp_path / "p", n=8)
    bomb = root / "opt" / "t0.png"
    data = bomb.read_bytes()  # rewrite the header to claim 60000 x 60000 pixels; the file stays tiny
    ihdr = b"IHDR" + struct.pack(">II", 60000, 60000) + data[24:29]
    bomb.write_bytes(data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:])
    code, msg = run(tmp_path, capsys, paired(root))
    assert code == 2 and "t0.png" in msg and "decompression bomb" in msg


def test_skip_policy_counts_unreadable_samples(tmp_path, capsys):
    root = write_pairs(tmp_path / "p", n=8)
    (root / "opt" / "t3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, _ = run(tmp_path, capsys, paired(root), overrides=("data.on_error=skip",))
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_samples"] == 1  # t3 drawn once in the one epoch, replaced by the next sample
    log = (tmp_path / "run" / "train.log").read_text()
    assert "t3.png" in log and "1 unreadable samples skipped" in log


def test_configs_are_data_only(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("run_dir: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    assert not Path("pwned").exists()


def test_pair_with_different_sizes(tmp_path, capsys):
    root = write_pairs(tmp_path / "p", n=8, sar_size=48)
    code, msg = run(tmp_path, capsys, paired(root))
    assert code == 2 and "is 40x40 but SAR" in msg and "48x48" in msg


def test_wrong_channel_count(tmp_path, capsys):
    root = write_pairs(tmp_path / "p", n=8)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "sar" / "t0.png")
    code, msg = run(tmp_path, capsys, paired(root))
    assert code == 2 and "t0.png: has 3 channels but config key 'model.sar_channels' expects 1" in msg


def test_empty_folder_and_missing_side(tmp_path, capsys):
    root = tmp_path / "p"
    (root / "opt").mkdir(parents=True)
    (root / "sar").mkdir()
    code, msg = run(tmp_path, capsys, paired(root))
    assert code == 2 and "holds no images" in msg and str(root / "opt") in msg
    root2 = write_pairs(tmp_path / "q", n=4)
    (root2 / "sar" / "t2.png").unlink()
    code, msg = run(tmp_path, capsys, paired(root2))
    assert code == 2 and "incomplete pair" in msg and "t2.png" in msg


def test_text_file_named_png(tmp_path, capsys):
    root = write_pairs(tmp_path / "p", n=8)
    (root / "opt" / "t5.png").write_text("not an image")
    code, msg = run(tmp_path, capsys, paired(root))
    assert code == 2 and "t5.png: not an image file" in msg


def test_unknown_config_key(tmp_path, capsys):
    code, msg = run(tmp_path, capsys, overrides=("train.learning_rate=0.1",))
    assert code == 2 and msg == "codemae: error: unknown config key 'train.learning_rate'"


def test_unwritable_run_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, msg = run(tmp_path, capsys, overrides=(f"run_dir={blocker}/run",))
    assert code == 2 and f"run folder {blocker}/run is not writable" in msg


def test_stats_command_writes_json(tmp_path, capsys):
    import json

    root = write_pairs(tmp_path / "p", n=6)
    out = tmp_path / "stats.json"
    assert main(["stats", str(root), "--split", "train", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["samples"] == 4 and len(data["opt"]["mean"]) == 3 and len(data["sar"]["std"]) == 1
    assert 0.4 < data["opt"]["mean"][0] < 0.6  # uniform random bytes
    assert main(["stats", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_corrupt_member_raises_or_is_skipped_and_counted(tmp_path):
    shards, _ = shard_set(tmp_path, pairs=16, per_shard=8)
    manifest = json.loads((shards / "manifest.json").read_text())
    path = shards / manifest["sources"][0]["shards"][0]["path"]
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name == "000000003.opt.png":
                data = b"\x89PNG\r\n\x1a\n garbage"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    cfg = stream_cfg(tmp_path, shards)
    with pytest.raises(DataError, match=r"shard-000000.tar:000000003.opt.png: corrupt or truncated image"):
        epoch_ids(stream_of(cfg))
    cfg = stream_cfg(tmp_path, shards, on_error="skip")
    stream = stream_of(cfg)
    stream.set_epoch(0)
    batches = list(DataLoader(stream, batch_size=None))
    # counted each time it is met (a stream a skipped record left short cycles to fill its last batch)
    assert sum(int(b["skipped"].sum()) for b in batches) >= 1 and all(len(b["id"]) == 4 for b in batches)
    assert (0, 3) not in {tuple(i) for b in batches for i in b["id"].tolist()}


def test_truncated_shard_is_reported(tmp_path):
    shards, _ = shard_set(tmp_path, pairs=16, per_shard=8)
    path = shards / "pairs" / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[:3000])
    cfg = stream_cfg(tmp_path, shards)
    with pytest.raises(DataError, match="shard-000001.tar"):
        epoch_ids(stream_of(cfg))
    assert main(["data", "check", str(shard_config_file(tmp_path, shards))]) == 2
