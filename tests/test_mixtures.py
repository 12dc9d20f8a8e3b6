"""Mixtures of real-dataset layouts: the reference layout, `codemae data check`, weights, bands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from codemae.cli import main
from codemae.config import ScalingConfig, SourceConfig, load_config
from codemae.data.check import check_source
from codemae.data.pipeline import build_dataset
from codemae.data.sampling import HomogeneousBatchSampler, Part, Pools
from codemae.data.sources import FolderSource
from codemae.errors import DataError
from conftest import shared_data, tiny_config

CH = {"opt": 3, "sar": 1}
ROOT = Path(__file__).resolve().parents[1]


def write_reference(root: Path, dataset: str, n: int = 6, splits: dict | None = None, size: int = 24) -> Path:
    """``<root>/<dataset>/{RGB,SAR}/<name>.png`` with split lists (default: 4 train, 2 test)."""
    rng = np.random.default_rng(1)
    base = root / dataset
    (base / "RGB").mkdir(parents=True)
    (base / "SAR").mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(base / "RGB" / f"p{i}.png")
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(base / "SAR" / f"p{i}.png")
    splits = splits or {"train": [f"p{i}.png" for i in range(n - 2)], "test": [f"p{i}.png" for i in range(n - 2, n)]}
    for name, names in splits.items():
        (base / f"{name}.txt").write_text("\n".join(names) + "\n")
    return root


def reference_source(**kw) -> SourceConfig:
    return SourceConfig(**{"name": "ds", "dataset": "ds", "kind": "paired", "layout": "reference", **kw})


def test_reference_layout_selects_split_lists(tmp_path):
    root = write_reference(tmp_path, "ds")
    train = FolderSource(reference_source(root=str(root), splits=["train"]), CH)
    assert train.stems == ["p0", "p1", "p2", "p3"] and train.load(0)["opt"].shape == (24, 24, 3)
    rest = FolderSource(reference_source(root=str(root), exclude=["test"]), CH)
    assert rest.stems == train.stems
    sar_only = FolderSource(reference_source(root=str(root), kind="sar"), CH)
    assert len(sar_only) == 6 and list(sar_only.load(0)) == ["sar"]


def test_data_check_clean_tree_passes(tmp_path):
    root = write_reference(tmp_path, "ds")
    report = check_source(reference_source(root=str(root), exclude=["test"], expected=4), CH)
    assert report.ok and (report.samples, report.pairs) == (4, 4)
    assert report.sizes == {(24, 24): 4} and report.channels == {"opt": {3: 4}, "sar": {1: 4}}


def test_data_check_finds_each_fault(tmp_path):
    root = write_reference(tmp_path, "ds", n=8, splits={"train": ["p0", "p1", "p2", "p3", "p4", "p5", "ghost"],
                                                        "test": ["p6", "p7"]})
    base = root / "ds"
    (base / "SAR" / "p1.png").unlink()  # a missing pair side
    (base / "RGB" / "p2.png").write_bytes(b"not an image")  # unreadable
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(base / "SAR" / "p3.png")  # 3 channels, config says 1
    cfg = reference_source(root=str(root), expected=8)  # no exclusion: the test split leaks
    report = check_source(cfg, {"opt": 3, "sar": 2})
    text = "\n".join(report.problems + report.unreadable)
    assert f"{base / 'RGB' / 'p1.png'} has no counterpart" in text
    assert f"{base / 'RGB' / 'p2.png'}: not an image file" in text
    assert "train.txt names 'ghost', which has no image" in text
    assert "2 samples of holdout split(s) test would be pretrained on" in text
    assert "have 3 channels but config key 'model.sar_channels' is 2" in text
    assert "7 samples found, 8 expected" in text
    assert not report.ok


def test_data_check_cli_exit_codes(tmp_path, capsys):
    root = write_reference(tmp_path / "data", "ds")
    config = tmp_path / "mix.yaml"
    config.write_text(f"data:\n  root: {tmp_path / 'data'}\n  sources:\n"
                      "    - {name: ds, dataset: ds, kind: paired, layout: reference, exclude: [test]}\n"
                      "    - {name: ds_opt, dataset: ds, kind: opt, layout: reference, holdout: []}\n")
    assert main(["data", "check", str(config)]) == 0
    out = capsys.readouterr().out
    assert "data check: 2 sources, 10 samples, no problems" in out
    (root / "ds" / "SAR" / "p0.png").write_bytes(b"")
    assert main(["data", "check", str(config)]) == 2
    out = capsys.readouterr().out
    assert "p0.png: empty file (0 bytes)" in out and "1 problems in 1 source(s)" in out


def test_mixed_pixel_types_are_reported_and_refused(tmp_path):
    root = write_reference(tmp_path, "ds")
    wide = np.full((24, 24, 3), 40000, np.uint16)
    tifffile.imwrite(root / "ds" / "RGB" / "p5.tif", wide)
    (root / "ds" / "RGB" / "p5.png").unlink()
    report = check_source(reference_source(root=str(root), holdout=[]), CH)
    assert any("mixed opt pixel types" in p for p in report.problems)
    cfg = reference_source(root=str(root), holdout=[], opt_scaling=ScalingConfig(dtype="uint8"))
    with pytest.raises(DataError, match="p5.tif: pixels are uint16 but the source's scaling expects uint8"):
        FolderSource(cfg, CH).load(5)


def test_weights_scale_each_sources_share():
    big, small = Part(np.arange(0, 100), 0.5), Part(np.arange(100, 110), 3.0)
    pools = Pools((big, small), (), ())
    assert pools.size("paired") == 50 + 30
    counts = np.zeros(110)
    rng = np.random.default_rng(0)
    for _ in range(200):
        draw = pools.draw("paired", rng)
        assert len(draw) == 80 and np.bincount(draw[draw >= 100] - 100, minlength=10).tolist() == [3] * 10
        counts += np.bincount(draw, minlength=110)
    assert counts[100:].sum() / counts.sum() == pytest.approx(30 / 80)
    assert counts[:100].mean() == pytest.approx(100, rel=0.02)  # half of the big source per epoch, each ~uniformly
    assert counts[:100].min() > 60


def test_weighted_mixture_keeps_batches_homogeneous():
    pools = Pools((Part(np.arange(0, 40), 0.5),), (Part(np.arange(40, 50), 2.0),), (Part(np.arange(50, 80)),))
    plans = [HomogeneousBatchSampler(pools, 4, world_size=2, rank=r, seed=3) for r in range(2)]
    assert len(plans[0]) == 20 // 8 + 30 // 8
    for group in plans[0].plan(0):
        for batch in group.indices:
            if group.paired:
                assert (batch < 40).all()
            else:
                assert ((batch[:4] >= 40) & (batch[:4] < 50)).all() and (batch[4:] >= 50).all()


def test_band_names_given_stats_and_tiles(tmp_path):
    (tmp_path / "opt").mkdir()
    (tmp_path / "sar").mkdir()
    s2 = np.arange(13, dtype=np.int16)[:, None, None] * 100 + np.zeros((13, 64, 64), np.int16)
    tifffile.imwrite(tmp_path / "opt" / "chip_S2.tif", s2)
    tifffile.imwrite(tmp_path / "sar" / "chip_S1.tif", np.stack([np.full((64, 64), -10.0), np.full((64, 64), -20.0)])
                     .astype(np.float32))
    raw = {"name": "chip", "kind": "paired", "root": str(tmp_path), "stem_replace": ["_S2=", "_S1="],
           "opt_bands": ["B4", "B3", "B2"], "sar_bands": ["VH"], "tile": 32, "sar_scaling": {"mode": "db"},
           "stats": "given", "given": {"opt_mean": [0.5], "opt_std": [0.25], "sar_mean": [0.2], "sar_std": [0.1]}}
    cfg = tiny_config(tmp_path / "run", data={"sources": [raw]})
    dataset = build_dataset(cfg.data, cfg.model.geometry, tmp_path / "run")
    source = dataset.sources[0]
    assert source.stems == ["chip@0_0", "chip@0_32", "chip@32_0", "chip@32_32"]
    arrays = source.load(3)
    assert arrays["opt"].shape == (32, 32, 3) and arrays["sar"].shape == (32, 32, 1)
    assert np.allclose(arrays["opt"][0, 0], [0.03, 0.02, 0.01])  # B4, B3, B2 of values band x 100 / 10000
    assert np.allclose(arrays["sar"], 0.2)  # VH = -20 dB on [-25, 0]
    sample = dataset[(0, 0)]
    assert sample["opt_mean"].tolist() == [0.5] and sample["sar_std"].tolist() == pytest.approx([0.1])


def test_unknown_band_name_names_the_file(tmp_path):
    (tmp_path / "t").mkdir()
    tifffile.imwrite(tmp_path / "t" / "a.tif", np.zeros((4, 16, 16), np.uint16), photometric="minisblack")
    source = FolderSource(SourceConfig(kind="opt", root=str(tmp_path / "t"), opt_bands=["B4"]), CH)
    with pytest.raises(DataError, match=r"a.tif: no band named 'B4' \(names: none known"):
        source.load(0)


def test_shared_data_check_is_clean(capsys):
    shared_data("")
    assert main(["data", "check", str(ROOT / "configs/data/shared_data.yaml"),
                 f"data.root={shared_data('')}"]) == 0
    assert "5 sources, 3695 samples, no problems" in capsys.readouterr().out


def test_ospretrain_mixture_config_encodes_table_i():
    cfg = load_config(ROOT / "configs/data/ospretrain1m.yaml")
    sources = {s.name: s for s in cfg.data.sources}
    assert len(sources) == 16  # Table I's 15 datasets, DFC23 as its two tracks
    paired = [s for s in sources.values() if s.kind == "paired"]
    assert len(paired) == 11 and {s.kind for s in sources.values()} == {"paired", "opt", "sar"}
    assert {n for n, s in sources.items() if s.exclude == ["test"]} == {"WHU-OPT-SAR", "OGSOD-2", "DDHR",
                                                                        "DFC23_Track1"}
    assert not {"PIE-RGB-SAR", "YESeg-OPT-SAR", "SSL4EO-S12"} & set(sources)
    assert sum(s.expected for s in sources.values() if s.kind != "paired") == 518_076
    assert sources["SpaceNet6"].given.opt_mean == [0.3712, 0.3928, 0.3576]


def test_paired_plus_unpaired_mixture_pretrains_and_logs_every_term(tmp_path):
    pairs = write_reference(tmp_path / "data", "pairs", n=8, size=40)
    sources = [{"name": "pairs", "dataset": "pairs", "kind": "paired", "layout": "reference", "holdout": []},
               {"name": "sar", "dataset": "pairs", "kind": "sar", "layout": "reference", "holdout": [],
                "weight": 0.5}]
    cfg = tiny_config(tmp_path / "run", method={"name": "codemae", "ccl": "cross_attention", "cdr": True,
                                                "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
                      data={"root": str(pairs), "sources": sources})
    from codemae.train.engine import pretrain
    from codemae.train.metrics import read_metrics

    summary = pretrain(cfg)
    assert summary["step"] == 2 * (8 // 4 + 4 // 4)  # 2 paired + 1 unpaired (half of 8 SAR) steps per epoch
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    paired = [r for r in rows if "ccl" in r]
    assert len(paired) == 4 and len(rows) - len(paired) == 2  # unpaired steps log reconstruction only
    assert all("cdr" in r for r in paired) and all("recon" in r for r in rows)
