from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from codemae.config import ScalingConfig, SourceConfig, SyntheticConfig
from codemae.batch import collate
from codemae.data.pipeline import PretrainDataset, build_dataset
from codemae.data.readers import match_channels, read_image, to_unit_range
from codemae.data.sampling import HomogeneousBatchSampler, Pools
from codemae.data.sources import FolderSource
from codemae.data.stats import compute_stats
from codemae.data.synthetic import CLASSES, generate_scene
from codemae.data.transforms import Normalisation, PairedCrop
from codemae.errors import DataError

from conftest import tiny_config

CH = {"opt": 3, "sar": 1}


def test_readers_by_content(tmp_path: Path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "bmp_named.tif", format="BMP")  # real-world quirk
    tifffile.imwrite(tmp_path / "band_first.tif", np.zeros((13, 16, 16), np.int16))
    tifffile.imwrite(tmp_path / "band_last.tif", np.zeros((16, 16, 3), np.uint16))
    assert np.array_equal(read_image(tmp_path / "a.png"), rgb)
    assert np.array_equal(read_image(tmp_path / "bmp_named.tif"), rgb)
    assert read_image(tmp_path / "band_first.tif").shape == (16, 16, 13)
    assert read_image(tmp_path / "band_last.tif").shape == (16, 16, 3)


def test_unit_range_scaling():
    db = np.array([[[-30.0], [-12.5], [0.0], [5.0]]], np.float32)
    assert to_unit_range(db, ScalingConfig(mode="db", db_range=[-25, 0]), "x").ravel().tolist() == [0.0, 0.5, 1.0, 1.0]
    lin = to_unit_range(np.array([[[-10.0]]], np.float32), ScalingConfig(mode="linear", db_range=[-20, 0]), "x")
    assert np.isclose(lin.item(), (0.1 - 0.01) / (1 - 0.01))
    u16 = to_unit_range(np.array([[[5000]]], np.uint16), ScalingConfig(max_value=10000), "x")
    assert u16.item() == 0.5
    with pytest.raises(DataError, match="scaling mode"):
        to_unit_range(db, ScalingConfig(), "f.tif")
    with pytest.raises(DataError, match="NaN"):
        to_unit_range(np.array([[[np.nan]]], np.float32), ScalingConfig(), "f.tif")


def test_channel_matching():
    gray = np.ones((2, 2, 1))
    assert match_channels(gray, 3, "g", "model.sar_channels").shape == (2, 2, 3)  # grayscale SAR as 3 channels
    with pytest.raises(DataError, match="g: has 1 channels but config key 'model.opt_channels' expects 3"):
        match_channels(gray, 3, "g", "model.opt_channels")  # a grayscale image among optical ones
    assert match_channels(np.ones((2, 2, 3)), 1, "g", "k").shape == (2, 2, 1)  # identical bands
    with pytest.raises(DataError, match="model.sar_channels"):
        match_channels(np.random.rand(2, 2, 2), 1, "f.png", "model.sar_channels")


def test_paired_folder_and_split(pairs_dir: Path):
    src = FolderSource(SourceConfig(kind="paired", root=str(pairs_dir), split="train"), CH)
    assert len(src) == 4 and src.stems == ["t0", "t1", "t2", "t3"]
    sample = src.load(0)
    assert sample["opt"].shape == (40, 40, 3) and sample["sar"].shape == (40, 40, 1)
    assert 0.0 <= sample["opt"].min() and sample["opt"].max() <= 1.0
    unpaired = FolderSource(SourceConfig(kind="sar", root=str(pairs_dir / "sar")), CH)
    assert unpaired.modalities == ("sar",) and len(unpaired) == 6


def test_paired_crop_is_identical_for_both_images():
    """Same content in both modalities -> same output: the crop box and flip are shared."""
    image = np.random.default_rng(0).random((48, 40, 1)).astype(np.float32)
    norm = Normalisation([0.0], [1.0])
    crop = PairedCrop(16, (0.2, 1.0), (0.75, 1.33), True, {"opt": norm, "sar": norm})
    for seed in range(5):
        out, _ = crop({"opt": image, "sar": image.copy()}, torch.Generator().manual_seed(seed))
        assert out["opt"].shape == (1, 16, 16)
        assert torch.equal(out["opt"], out["sar"])
    a = crop({"opt": image}, torch.Generator().manual_seed(0))[0]["opt"]
    b = crop({"opt": image}, torch.Generator().manual_seed(1))[0]["opt"]
    assert not torch.equal(a, b)


def test_sampler_homogeneous_distributed_and_deterministic():
    pools = Pools.of(np.arange(0, 20), np.arange(20, 26), np.arange(26, 35))
    batches = {}
    for rank in range(2):
        sampler = HomogeneousBatchSampler(pools, batch_size=3, world_size=2, rank=rank, seed=7)
        sampler.set_epoch(0)
        batches[rank] = [[i for i, _ in b] for b in sampler]
        assert len(batches[rank]) == len(sampler) == 20 // 6 + 9 // 6
    for b0, b1 in zip(batches[0], batches[1]):
        kinds = {bool(np.isin(b, np.arange(0, 20)).all()) for b in (b0, b1)}
        assert len(kinds) == 1  # both ranks run the same kind at the same step
        for b in (b0, b1):
            if np.isin(b, np.arange(0, 20)).all():
                assert len(b) == 3
            else:  # unpaired: 3 optical then 3 SAR
                assert np.isin(b[:3], np.arange(20, 26)).all() and np.isin(b[3:], np.arange(26, 35)).all()
    paired_seen = [i for r in batches.values() for b in r for i in b if i < 20]
    assert len(paired_seen) == len(set(paired_seen)) == 18  # no duplicates across ranks
    again = HomogeneousBatchSampler(pools, 3, 2, 0, seed=7)
    again.set_epoch(0, start=1)
    assert [[i for i, _ in b] for b in again] == batches[0][1:]
    again.set_epoch(1)
    assert [[i for i, _ in b] for b in again] != batches[0]


def test_sampler_refuses_too_little_data():
    with pytest.raises(DataError, match="one step"):
        HomogeneousBatchSampler(Pools.of(np.arange(3), np.arange(0), np.arange(0)), 4)


def test_collate_marks_paired_and_unpaired():
    paired = collate([{"opt": torch.zeros(3, 4, 4), "sar": torch.zeros(1, 4, 4)}] * 2)
    assert paired["paired"] and paired["opt"].shape == (2, 3, 4, 4)
    unpaired = collate([{"opt": torch.zeros(3, 4, 4)}, {"sar": torch.zeros(1, 4, 4)}])
    assert not unpaired["paired"] and unpaired["opt"].shape[0] == unpaired["sar"].shape[0] == 1


def test_synthetic_scenes_deterministic_with_labels():
    cfg = SyntheticConfig(image_size=64, cloud_cover=0.3, misregistration=2)
    a, b = generate_scene(3, cfg), generate_scene(3, cfg)
    assert np.array_equal(a.optical, b.optical) and np.array_equal(a.sar, b.sar)
    assert not np.array_equal(a.sar, generate_scene(4, cfg).sar)
    assert a.optical.shape == (64, 64, 3) and a.sar.shape == (64, 64, 1) and a.labels.shape == (64, 64)
    assert 0 <= a.dominant_class < len(CLASSES) and a.labels.max() < len(CLASSES)


def test_speckle_looks_control_sar_noise():
    """More looks -> less speckle: the SAR of a scene varies less around its class means."""
    def spread(looks: float) -> float:
        s = generate_scene(0, SyntheticConfig(image_size=64, speckle_looks=looks))
        return float(np.mean([s.sar[s.labels == c].std() for c in np.unique(s.labels)]))
    assert spread(16.0) < spread(1.0)


def test_stats_and_dataset(tmp_path: Path, pairs_dir: Path):
    cfg = tiny_config(tmp_path / "run", data={"sources": [{"kind": "paired", "root": str(pairs_dir), "split": "train"}]})
    dataset = build_dataset(cfg.data, cfg.model.geometry, tmp_path / "run")
    assert isinstance(dataset, PretrainDataset) and len(dataset) == 4
    stats = compute_stats(dataset.sources[0], 4)
    assert abs(stats["opt"].mean[0] - 0.5) < 0.05 and len(stats["sar"].std) == 1
    assert len(list((tmp_path / "run" / "stats").glob("pairs-*.json"))) == 1
    item = dataset[(0, 123)]
    assert item["opt"].shape == (3, 32, 32) and torch.equal(item["opt"], dataset[(0, 123)]["opt"])
