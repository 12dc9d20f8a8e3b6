"""Every bad input stops with exit code 2 and one line naming the file, key or folder at fault."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from codemae.cli import main
from codemae.config import to_dict

from conftest import tiny_config, write_pairs


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


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_image(tmp_path, capsys, workers):
    root = write_pairs(tmp_path / "p", n=8)
    bad = root / "opt" / "t3.png"
    bad.write_bytes(bad.read_bytes()[:200])
    # stats=none: the error must come from the training loader (and its worker), not the stats pass
    code, msg = run(tmp_path, capsys, paired(root, stats="none"), overrides=(f"data.num_workers={workers}",))
    assert code == 2 and str(bad) in msg and "truncated" in msg


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
