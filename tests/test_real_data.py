"""The real samples in ../shared/data load through the same readers and sources (skipped where absent)."""

import numpy as np
import pytest

from codemae.config import ScalingConfig, SourceConfig
from codemae.data.readers import load_unit_image, read_image
from codemae.data.sources import FolderSource

from conftest import shared_data


def test_s1s2_pairs_split_by_scene():
    root = shared_data("s1s2_pairs")
    train = FolderSource(SourceConfig(kind="paired", root=str(root), split="train"), {"opt": 3, "sar": 1})
    val = FolderSource(SourceConfig(kind="paired", root=str(root), split="val"), {"opt": 3, "sar": 1})
    assert len(train) + len(val) == 1104
    assert not set(train.stems) & set(val.stems)
    sample = train.load(0)
    assert sample["opt"].shape == (256, 256, 3) and sample["sar"].shape == (256, 256, 1)


def test_sen12mscr_float_db_sar_and_uint16_optical():
    root = shared_data("sen12mscr")
    sar_file = sorted((root / "sar_train").glob("*.tif"))[0]
    opt_file = sorted((root / "gt_train").glob("*.tif"))[0]
    raw = read_image(sar_file)
    assert raw.dtype == np.float32 and raw.shape[2] == 2 and raw.min() < -5  # dB values
    sar = load_unit_image(sar_file, ScalingConfig(mode="db", db_range=[-30, 0]), 2, "model.sar_channels")
    assert sar.shape == (256, 256, 2) and 0 <= sar.min() and sar.max() <= 1 and sar.std() > 0.01
    opt = load_unit_image(opt_file, ScalingConfig(max_value=4000), 3, "model.opt_channels")
    assert opt.shape == (256, 256, 3) and 0 < opt.mean() < 1


def test_hr_pairs_bmp_under_tif_name_read_by_content():
    root = shared_data("hr_pairs")
    sar = read_image(root / "sar" / "54.tif")
    assert sar.shape == (1000, 1000, 3)
    gray = load_unit_image(root / "sar" / "54.tif", ScalingConfig(), 1, "model.sar_channels")
    assert gray.shape == (1000, 1000, 1)  # three identical channels collapse to one


def test_sen1floods11_band_first_geotiff():
    root = shared_data("sen1floods11")
    s2 = read_image(next((root / "S2").glob("*.tif")))
    s1 = read_image(next((root / "S1").glob("*.tif")))
    assert s2.shape == (512, 512, 13) and s1.shape == (512, 512, 2)


@pytest.mark.parametrize("cls", ["2S1", "T72"])
def test_mstar_class_folders_as_unpaired_sar(cls):
    root = shared_data("mstar") / "train_17deg" / cls
    source = FolderSource(SourceConfig(kind="sar", root=str(root)), {"opt": 3, "sar": 1})
    assert len(source) > 100 and source.load(0)["sar"].shape == (128, 128, 1)
