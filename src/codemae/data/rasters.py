"""Scenes: large rasters read window by window, with their georeferencing and nodata.

With the ``geo`` extra (rasterio) any GDAL-readable source (GeoTIFF, a remote COG through
``/vsicurl/``, JPEG 2000, ...) is read by windows, with its CRS, affine transform and validity mask
(nodata value, internal mask or alpha band). Without it, a TIFF is decoded once by tifffile and held
in memory; its GDAL_NODATA tag is honoured but georeferencing is not read, and written feature maps
carry none (the caller says so).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from codemae.data.readers import GDAL_NODATA, read_raster, valid_pixels
from codemae.errors import DataError

try:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    from rasterio.windows import Window
except ImportError:  # pragma: no cover - the geo extra is optional
    rasterio = None


@dataclass
class Scene:
    """An open raster: size, bands, pixel type, georeferencing (None without rasterio or when the file has
    none) and its reader. ``read(top, left, height, width)`` gives raw values (h, w, C) and validity (h, w)."""

    path: str
    height: int
    width: int
    bands: int
    dtype: str
    crs: Any = None
    transform: Any = None  # an affine.Affine
    handle: Any = field(default=None, repr=False)

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    def read(self, top: int, left: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        if rasterio is not None and hasattr(self.handle, "read_masks"):
            window = Window(left, top, width, height)
            values = self.handle.read(window=window).transpose(1, 2, 0)
            valid = (self.handle.read_masks(window=window) > 0).all(0)
        else:
            array, nodata = self.handle
            values = array[top:top + height, left:left + width]
            valid = valid_pixels(values, nodata)
        return values, valid


@contextmanager
def open_scene(path: str | Path) -> Iterator[Scene]:
    """Open a raster for windowed reading (rasterio), or decode a TIFF whole (tifffile, without it)."""
    path = str(path)
    if rasterio is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    crs = src.crs
                    yield Scene(path, src.height, src.width, src.count, src.dtypes[0], crs,
                                src.transform if crs is not None else None, src)
                    return
        except RasterioIOError as err:
            raise DataError(f"{path}: cannot be read as a raster ({str(err).splitlines()[0]})") from err
    array, nodata = read_raster(path)
    yield Scene(path, array.shape[0], array.shape[1], array.shape[2], array.dtype.name, handle=(array, nodata))


def write_feature_map(path: str | Path, features: np.ndarray, scene: Scene, patch: int) -> None:
    """(D, h, w) float32 features (NaN: nodata) as a GeoTIFF on the scene's grid coarsened ``patch`` times:
    same CRS, transform scaled by the patch size (georeferencing needs rasterio)."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    if rasterio is None:
        tifffile.imwrite(path, features, photometric="minisblack", planarconfig="separate", compression="zlib",
                         extratags=[(GDAL_NODATA, "s", 0, "nan", True)])
        return
    from affine import Affine

    transform = (scene.transform or Affine.identity()) @ Affine.scale(patch, patch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", height=features.shape[1], width=features.shape[2],
                           count=features.shape[0], dtype="float32", crs=scene.crs, transform=transform,
                           nodata=float("nan"), compress="deflate") as dst:
            dst.write(features)
