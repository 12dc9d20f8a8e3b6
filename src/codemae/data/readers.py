"""Reading image files by their content, and mapping raw values to [0, 1].

PNG/JPEG/BMP go through Pillow, (Geo)TIFF through tifffile; the format is taken
from the file's first bytes, not its name (real datasets ship BMPs named .tif).
Every failure is a :class:`DataError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from codemae.config import ScalingConfig
from codemae.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
MAX_BANDS = 64  # a leading axis no longer than this, before a longer one, is a band axis


def read_image(path: str | Path) -> np.ndarray:
    """Read ``path`` as an (H, W, C) array in its stored dtype."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as err:
        raise DataError(f"{path}: cannot open ({err.strerror or err})") from err
    if not head:
        raise DataError(f"{path}: empty file (0 bytes)")
    array = _read_tiff(path) if head in TIFF_MAGIC else _read_pillow(path)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3 and array.shape[0] <= MAX_BANDS and array.shape[0] < array.shape[2]:
        array = array.transpose(1, 2, 0)  # band-first GeoTIFF
    if array.ndim != 3:
        raise DataError(f"{path}: expected a 2-D image with bands, got an array of shape {array.shape}")
    return array


def _read_tiff(path: Path) -> np.ndarray:
    try:
        return tifffile.imread(path)
    except Exception as err:  # tifffile raises many types for broken files
        raise DataError(f"{path}: corrupt or unreadable TIFF ({err})".splitlines()[0]) from err


def _read_pillow(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr"):
                image = image.convert("RGB" if image.mode != "LA" else "L")
            return np.asarray(image)
    except UnidentifiedImageError as err:
        raise DataError(f"{path}: not an image file Pillow or tifffile can read") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: corrupt or truncated image ({err})") from err


def to_unit_range(array: np.ndarray, scaling: ScalingConfig, path: str | Path) -> np.ndarray:
    """Map raw pixel values to float32 in [0, 1] according to ``scaling``."""
    x = array.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: contains NaN or infinite pixel values")
    if scaling.mode == "db":
        lo, hi = scaling.db_range
        return np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    if scaling.mode == "linear":
        lo, hi = (10.0 ** (v / 10.0) for v in scaling.db_range)
        return np.clip((10.0 ** (x / 10.0) - lo) / (hi - lo), 0.0, 1.0)
    if array.dtype == np.uint8:
        return x / 255.0
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(x / scaling.max_value, 0.0, 1.0)
    if x.min() < 0.0 or x.max() > 1.0:
        raise DataError(
            f"{path}: float values span [{x.min():.3g}, {x.max():.3g}], outside [0, 1]; "
            "set the source's scaling mode to 'db' or 'linear'"
        )
    return x


def match_channels(array: np.ndarray, channels: int, path: str | Path, key: str) -> np.ndarray:
    """Return ``array`` with ``channels`` bands: equal counts pass, a single band is
    replicated (grayscale SAR as 3 channels), identical bands collapse to one; any
    other mismatch is an error naming the file and the config key."""
    have = array.shape[2]
    if have == channels:
        return array
    if have == 1:
        return np.repeat(array, channels, axis=2)
    if channels == 1 and all(np.array_equal(array[:, :, 0], array[:, :, i]) for i in range(1, have)):
        return array[:, :, :1]
    raise DataError(f"{path}: has {have} channels but config key '{key}' expects {channels}")


def load_unit_image(path: str | Path, scaling: ScalingConfig, channels: int, key: str,
                    bands: list[int] | None = None) -> np.ndarray:
    """Read one file and turn it into a float32 (H, W, C) array in [0, 1] (see :func:`unit_array`)."""
    return unit_array(read_image(path), scaling, channels, path, key, bands)


def unit_array(array: np.ndarray, scaling: ScalingConfig, channels: int, path: str | Path, key: str,
               bands: list[int] | None = None) -> np.ndarray:
    """Keep ``bands`` (indices, all if None), match ``channels`` and scale to [0, 1]; errors name ``path``."""
    if bands:
        if max(bands) >= array.shape[2]:
            raise DataError(f"{path}: has {array.shape[2]} bands, band index {max(bands)} asked for")
        array = array[:, :, bands]
    return to_unit_range(match_channels(array, channels, path, key), scaling, path)
