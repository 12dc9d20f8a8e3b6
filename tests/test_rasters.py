"""Real-world rasters: compressed GeoTIFFs, nodata as masked pixels, windowed tile reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from codemae.config import SourceConfig
from codemae.data import sources
from codemae.data.rasters import open_scene
from codemae.data.readers import GDAL_NODATA, load_unit_image, read_image
from codemae.data.sources import FolderSource
from codemae.data.stats import compute_stats
from codemae.data.transforms import Normalisation, PairedCrop
from codemae.config import ScalingConfig

RNG = np.random.default_rng(0)


def smooth_rgb(size: int = 64) -> np.ndarray:
    """A smooth uint8 RGB image (JPEG keeps it within a few levels)."""
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([(x * 3) % 256, (y * 3) % 256, ((x + y) * 2) % 256], axis=2).astype(np.uint8)


@pytest.mark.parametrize("compression, stored", [("lzw", "LZW"), ("zlib", "ADOBE_DEFLATE"), ("zstd", "ZSTD")])
def test_losslessly_compressed_geotiffs_read_exactly(tmp_path, compression, stored):
    pytest.importorskip("imagecodecs")
    image = RNG.integers(0, 10000, (48, 40, 4), dtype=np.uint16)
    path = tmp_path / f"{compression}.tif"
    tifffile.imwrite(path, image, compression=compression, photometric="minisblack", planarconfig="contig")
    assert tifffile.TiffFile(path).pages[0].compression.name == stored
    assert np.array_equal(read_image(path), image)


def test_jpeg_compressed_geotiff_reads_close_to_its_pixels(tmp_path):
    pytest.importorskip("imagecodecs")
    image = smooth_rgb()
    path = tmp_path / "jpeg.tif"
    tifffile.imwrite(path, image, compression="jpeg", photometric="rgb")
    assert tifffile.TiffFile(path).pages[0].compression.name == "JPEG"
    got = read_image(path)
    assert got.shape == image.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - image).mean() < 3  # lossy, but the same picture


def write_nodata_tiff(path: Path, values: np.ndarray, nodata: float) -> Path:
    tifffile.imwrite(path, values.squeeze(2) if values.shape[2] == 1 else values, photometric="minisblack",
                     planarconfig="contig" if values.shape[2] > 1 else None,
                     extratags=[(GDAL_NODATA, "s", 0, str(nodata), True)])
    return path


def test_nodata_pixels_become_nan_and_statistics_ignore_them(tmp_path):
    values = np.full((4, 4, 2), 0.5, dtype=np.float32)
    values[0, 0] = -9999.0  # one pixel nodata in both bands
    values[1, 2, 1] = -9999.0  # one band of another: the whole pixel is nodata
    values[3, 3] = [0.25, 0.75]
    write_nodata_tiff(tmp_path / "a.tif", values, -9999)
    unit = load_unit_image(tmp_path / "a.tif", ScalingConfig(), 2, "model.opt_channels")
    assert np.isnan(unit[0, 0]).all() and np.isnan(unit[1, 2]).all() and np.isfinite(unit).sum() == 2 * 14
    source = FolderSource(SourceConfig(kind="opt", root=str(tmp_path), holdout=[]), {"opt": 2, "sar": 1})
    stats = compute_stats(source, 8)["opt"]
    # 14 valid pixels: 13 at 0.5 and one at (0.25, 0.75); -9999 would drag the mean far below 0
    assert np.allclose(stats.mean, [(13 * 0.5 + 0.25) / 14, (13 * 0.5 + 0.75) / 14], atol=1e-6)


def test_training_crops_carry_no_nan_and_nodata_sits_at_the_mean():
    image = np.full((8, 8, 1), 0.8, dtype=np.float32)
    image[:4] = np.nan
    norm = Normalisation([0.8], [0.1])
    out, _ = PairedCrop(8, (1.0, 1.0), (1.0, 1.0), False, {"opt": norm})({"opt": image}, torch.Generator())
    assert torch.isfinite(out["opt"]).all() and torch.allclose(out["opt"], torch.zeros(1, 8, 8), atol=1e-5)


def test_tiles_are_read_by_window_with_rasterio_and_decoded_once_without(tmp_path, monkeypatch):
    image = RNG.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    root = tmp_path / "scenes"
    root.mkdir()
    tifffile.imwrite(root / "s.tif", image, photometric="rgb", compression="lzw")
    cfg = SourceConfig(kind="opt", root=str(root), tile=32, holdout=[])
    expected = [image[y:y + 32, x:x + 32] / 255.0 for y in (0, 32) for x in (0, 32, 64)]
    decodes = []
    real = sources.read_raster
    monkeypatch.setattr(sources, "read_raster", lambda *a: decodes.append(a) or real(*a))
    for backend in ("rasterio", None):
        if backend:
            pytest.importorskip("rasterio")
        else:
            monkeypatch.setattr(sources, "rasterio", None)
        source = FolderSource(cfg, {"opt": 3, "sar": 1})
        tiles = [source.load(i)["opt"] for i in range(len(source))]
        assert len(tiles) == 6 and all(np.allclose(t, e, atol=1e-6) for t, e in zip(tiles, expected))
    assert len(decodes) == 1  # rasterio read windows; without it the scene was decoded once for six tiles


def test_open_scene_reads_windows_crs_and_nodata(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    data = RNG.integers(1, 255, (2, 20, 30), dtype=np.uint8)
    data[:, 5, 7] = 0
    path = tmp_path / "g.tif"
    with rasterio.open(path, "w", driver="GTiff", height=20, width=30, count=2, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4200000, 10, 10), nodata=0, compress="lzw") as dst:
        dst.write(data)
    with open_scene(path) as scene:
        assert (scene.height, scene.width, scene.bands, scene.georeferenced) == (20, 30, 2, True)
        values, valid = scene.read(4, 6, 3, 4)
    assert np.array_equal(values, data[:, 4:7, 6:10].transpose(1, 2, 0))
    assert not valid[1, 1] and valid.sum() == 11


def test_segmentation_scenes_ignore_the_pixels_their_file_marks_nodata(tmp_path):
    from PIL import Image

    from codemae.eval.segmentation import IGNORE, scene_regions

    values = np.full((8, 6, 1), 0.5, dtype=np.float32)
    values[1, 2] = values[6, 4] = -9999.0
    write_nodata_tiff(tmp_path / "sar.tif", values, -9999)
    Image.fromarray(np.ones((8, 6), dtype=np.uint8)).save(tmp_path / "labels.png")
    data = scene_regions({"sar": str(tmp_path / "sar.tif")}, str(tmp_path / "labels.png"), {"opt": 3, "sar": 1},
                         {}, {"sar": ScalingConfig()}, 0.5)
    labels = torch.cat(data.masks)
    assert labels[1, 2] == IGNORE and labels[6, 4] == IGNORE and (labels == 1).sum() == 46
    assert all(torch.isfinite(x["sar"]).all() for x in data.images)


def test_windowed_tiles_mask_the_files_nodata(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    data = np.full((1, 64, 64), 5000, dtype=np.uint16)
    data[0, 40, 10] = 65535
    root = tmp_path / "sar"
    root.mkdir()
    with rasterio.open(root / "s.tif", "w", driver="GTiff", height=64, width=64, count=1, dtype="uint16",
                       nodata=65535) as dst:
        dst.write(data)
    source = FolderSource(SourceConfig(kind="sar", root=str(root), tile=32, holdout=[]), {"opt": 3, "sar": 1})
    assert source.windowable(root / "s.tif")
    tile = source.load(2)["sar"]  # rows 32..63, columns 0..31
    assert np.isnan(tile[8, 10, 0]) and np.isfinite(tile).sum() == 32 * 32 - 1
    assert np.allclose(compute_stats(source, 8)["sar"].mean, [0.5])  # 5000 / 10000; the 65535 left out


def test_a_tiled_pair_of_different_sizes_is_refused_when_listed(tmp_path):
    from codemae.errors import DataError

    for m, size in (("opt", 64), ("sar", 48)):
        (tmp_path / m).mkdir()
        tifffile.imwrite(tmp_path / m / "s.tif", np.zeros((size, size), np.uint8))
    with pytest.raises(DataError, match=r"pair 's': optical .*s.tif is 64x64 but SAR .*s.tif is 48x48"):
        FolderSource(SourceConfig(kind="paired", root=str(tmp_path), tile=32, holdout=[]), {"opt": 1, "sar": 1})


def test_segmentation_folders_ignore_nodata_pixels_and_feed_no_nan(tmp_path):
    from PIL import Image

    from codemae.eval.segmentation import IGNORE, folder_segmentation

    for m in ("opt", "sar", "labels"):
        (tmp_path / m).mkdir()
    values = np.full((8, 8, 3), 0.5, dtype=np.float32)
    values[2, 3] = -9999.0
    write_nodata_tiff(tmp_path / "opt" / "a.tif", values, -9999)
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(tmp_path / "sar" / "a.png")
    Image.fromarray(np.ones((8, 8), dtype=np.uint8)).save(tmp_path / "labels" / "a.png")
    data = folder_segmentation(str(tmp_path), str(tmp_path / "labels"), {"opt": 3, "sar": 1})
    assert data.masks[0][2, 3] == IGNORE and (data.masks[0] == 1).sum() == 63
    assert torch.isfinite(data.images[0]["opt"]).all()
