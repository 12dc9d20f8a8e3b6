"""Reading image files by their content, and mapping raw values to [0, 1].

PNG/JPEG/BMP go through Pillow, (Geo)TIFF through tifffile; the format is taken
from the file's first bytes, not its name (real datasets ship BMPs named .tif).
Every failure is a :class:`DataError` naming the file.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import tifffile
from PIL import Image, ImageOps, UnidentifiedImageError

from codemae.config import ScalingConfig
from codemae.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
MAX_BANDS = 64  # a leading axis no longer than this, before a longer one, is a band axis
CONVERTED_TO_RGB = ("P", "PA", "RGBA", "CMYK", "YCbCr")  # Pillow modes read as RGB (LA: as L)
MAX_PIXELS = 1 << 27  # height x width x bands above this is refused as a decompression bomb
EXIF_ORIENTATION = 0x0112
GDAL_NODATA = 42113  # the TIFF tag GDAL keeps a raster's nodata value in (ASCII)
MAX_DECODED_BYTES = 1 << 30  # and so is a TIFF whose decoded array would exceed 1 GiB
BAND_NAMES = {  # default names by band count: Sentinel-2 L1C / L2A, Sentinel-1 dual-pol
    13: ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"],
    12: ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"],
    2: ["VV", "VH"],
}

ImageFile = Union[str, Path, bytes]


@dataclass(frozen=True)
class Header:
    """What a file's header says: (height, width, bands) and pixel type."""

    height: int
    width: int
    bands: int
    dtype: str


def read_image(path: ImageFile, name: str | None = None) -> np.ndarray:
    """Read a file (path, or its bytes with ``name`` for messages) as an (H, W, C) array in its stored dtype."""
    return read_raster(path, name)[0]


def read_raster(path: ImageFile, name: str | None = None) -> tuple[np.ndarray, float | None]:
    """:func:`read_image` and the file's nodata value (a TIFF's GDAL_NODATA tag; None if it has none)."""
    with _opened(path, name) as (f, label):
        tiff = f.read(4) in TIFF_MAGIC
        array, nodata = _read_tiff(f, label) if tiff else (_read_pillow(f, label), None)
    return _bands_last(array, label, band_first_possible=tiff), nodata


def read_header(path: ImageFile, name: str | None = None) -> Header:
    """The image's size, band count and pixel type from its header, without decoding pixels."""
    with _opened(path, name) as (f, label):
        if f.read(4) in TIFF_MAGIC:
            f.seek(0)
            try:
                with tifffile.TiffFile(f) as tif:
                    series = tif.series[0]
                    shape, dtype = series.shape, np.dtype(series.dtype)
            except Exception as err:  # tifffile raises many types for broken files
                raise DataError(f"{label}: corrupt or unreadable TIFF ({err})".splitlines()[0]) from err
            if len(shape) == 2:
                shape = (*shape, 1)
            elif _band_first(shape):
                shape = (*shape[1:], shape[0])
            if len(shape) != 3:
                raise DataError(f"{label}: expected a 2-D image with bands, got an array of shape {shape}")
            return Header(shape[0], shape[1], shape[2], dtype.name)
        f.seek(0)
        with _pillow(f, label) as image:
            dtype = {"I;16": "uint16", "I;16B": "uint16", "I": "int32", "F": "float32"}.get(image.mode, "uint8")
            bands = 1 if image.mode == "LA" else 3 if image.mode in CONVERTED_TO_RGB else len(image.getbands())
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # rotated by 90 degrees
            height, width = (image.width, image.height) if turned else (image.height, image.width)
            return Header(height, width, bands, dtype)


@contextmanager
def _opened(path: ImageFile, name: str | None) -> Iterator[tuple[BinaryIO, str]]:
    label = name or ("<bytes>" if isinstance(path, bytes) else str(path))
    if isinstance(path, bytes):
        if not path:
            raise DataError(f"{label}: empty file (0 bytes)")
        yield io.BytesIO(path), label
        return
    try:
        f = Path(path).open("rb")
    except OSError as err:
        raise DataError(f"{label}: cannot open ({err.strerror or err})") from err
    with f:
        if not f.read(1):
            raise DataError(f"{label}: empty file (0 bytes)")
        f.seek(0)
        yield f, label


def _band_first(shape: tuple[int, ...]) -> bool:
    """A band-first GeoTIFF layout: (bands, H, W) with a short leading axis."""
    return len(shape) == 3 and shape[0] <= MAX_BANDS and shape[0] < shape[2]


def _bands_last(array: np.ndarray, label: str, band_first_possible: bool) -> np.ndarray:
    """(H, W, C) from a 2-D array, a band-first TIFF array (only TIFFs store bands first: a 1-pixel-high
    PNG is an image, not 1 band) or an (H, W, C) array."""
    if array.ndim == 2:
        array = array[:, :, None]
    elif band_first_possible and _band_first(array.shape):
        array = array.transpose(1, 2, 0)
    if array.ndim != 3:
        raise DataError(f"{label}: expected a 2-D image with bands, got an array of shape {array.shape}")
    return array


def _check_size(pixels: int, label: str) -> None:
    if pixels > MAX_PIXELS:
        raise DataError(f"{label}: {pixels} pixel values exceed the limit of {MAX_PIXELS} "
                        "(a decompression bomb, or a scene to tile before training)")


def _read_tiff(f: BinaryIO, label: str) -> tuple[np.ndarray, float | None]:
    """The decoded first series (any compression imagecodecs reads: LZW, JPEG, deflate, ZSTD, ...) and
    its nodata value."""
    f.seek(0)
    try:
        with tifffile.TiffFile(f) as tif:
            series = tif.series[0]
            _check_size(int(np.prod(series.shape)), label)
            decoded = int(np.prod(series.shape)) * np.dtype(series.dtype).itemsize
            if decoded > MAX_DECODED_BYTES:
                raise DataError(f"{label}: decodes to {decoded} bytes, over the {MAX_DECODED_BYTES}-byte limit "
                                "(a decompression bomb, or a scene to tile before training)")
            return tif.asarray(), tiff_nodata(tif)
    except DataError:
        raise
    except Exception as err:  # tifffile raises many types for broken files
        raise DataError(f"{label}: corrupt or unreadable TIFF ({err})".splitlines()[0]) from err


@contextmanager
def _pillow(f: BinaryIO, label: str) -> Iterator[Image.Image]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as image:
                _check_size(image.width * image.height * len(image.getbands()), label)
                yield image
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        if isinstance(err, UnidentifiedImageError):
            raise DataError(f"{label}: not an image file Pillow or tifffile can read") from err
        raise DataError(f"{label}: refused as a decompression bomb ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{label}: corrupt or truncated image ({err})") from err


def _read_pillow(f: BinaryIO, label: str) -> np.ndarray:
    f.seek(0)
    with _pillow(f, label) as image:
        try:
            image.load()
            image = ImageOps.exif_transpose(image)  # a rotated JPEG stays aligned with its SAR
            if image.mode in CONVERTED_TO_RGB or image.mode == "LA":
                image = image.convert("RGB" if image.mode != "LA" else "L")
            return np.asarray(image)
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{label}: corrupt or truncated image ({err})") from err


def valid_pixels(values: np.ndarray, nodata: float | None) -> np.ndarray:
    """(h, w) True where no band holds ``nodata`` (NaN counts as nodata in float rasters)."""
    invalid = np.zeros(values.shape[:2], dtype=bool)
    if np.issubdtype(values.dtype, np.floating):
        invalid |= np.isnan(values).any(2)
    if nodata is not None and not np.isnan(nodata):
        invalid |= (values == nodata).any(2)
    return ~invalid


def tiff_nodata(tif: tifffile.TiffFile) -> float | None:
    """The GDAL_NODATA value of a TIFF's first page, or None."""
    tag = tif.pages[0].tags.get(GDAL_NODATA)
    if tag is None:
        return None
    try:
        return float(str(tag.value).strip("\x00 "))
    except ValueError:
        return None


def band_indices(bands: list[str], names: list[str], count: int, label: str) -> list[int]:
    """Band picks (indices as digit strings, or names) as indices into a file of ``count`` bands."""
    names = names or BAND_NAMES.get(count, [])
    out = []
    for band in bands:
        if band.isdigit():
            index = int(band)
        elif band in names:
            index = names.index(band)
        else:
            known = ", ".join(names) if names else "none known for this band count; set the source's band names"
            raise DataError(f"{label}: no band named '{band}' (names: {known})")
        if index >= count:
            raise DataError(f"{label}: has {count} bands, band index {index} asked for")
        out.append(index)
    return out


def to_unit_range(array: np.ndarray, scaling: ScalingConfig, path: str | Path,
                  valid: np.ndarray | None = None) -> np.ndarray:
    """Map raw pixel values to float32 in [0, 1] according to ``scaling``; pixels outside the (H, W) mask
    ``valid`` (nodata) become NaN in every band, and their values are not checked or scaled."""
    if valid is not None and not valid.any():
        return np.full(array.shape[:2] + (array.shape[2],), np.nan, dtype=np.float32)
    if valid is not None and not valid.all():
        unit = to_unit_range(np.where(valid[:, :, None], array, array[valid][:1]), scaling, path)
        unit[~valid] = np.nan
        return unit
    if scaling.dtype and array.dtype.name != scaling.dtype:
        raise DataError(f"{path}: pixels are {array.dtype.name} but the source's scaling expects {scaling.dtype}")
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
    """Return ``array`` with ``channels`` bands: equal counts pass, a single SAR band is
    replicated (grayscale SAR as 3 channels, as the reference code does), identical bands
    collapse to one; any other mismatch (a grayscale image among optical ones too) is an
    error naming the file and the config key."""
    have = array.shape[2]
    if have == channels:
        return array
    if have == 1 and key == "model.sar_channels":
        return np.repeat(array, channels, axis=2)
    if channels == 1 and all(np.array_equal(array[:, :, 0], array[:, :, i]) for i in range(1, have)):
        return array[:, :, :1]
    raise DataError(f"{path}: has {have} channels but config key '{key}' expects {channels}")


def load_unit_image(path: ImageFile, scaling: ScalingConfig, channels: int, key: str,
                    bands: list[int] | None = None, name: str | None = None) -> np.ndarray:
    """Read one file (or its bytes, called ``name``) as a float32 (H, W, C) array in [0, 1], NaN at its
    nodata pixels (see :func:`unit_array`)."""
    array, nodata = read_raster(path, name)
    valid = valid_pixels(array, nodata) if nodata is not None else None
    return unit_array(array, scaling, channels, name or str(path), key, bands, valid)


def unit_array(array: np.ndarray, scaling: ScalingConfig, channels: int, path: str | Path, key: str,
               bands: list[int] | None = None, valid: np.ndarray | None = None) -> np.ndarray:
    """Keep ``bands`` (indices, all if None), match ``channels`` and scale to [0, 1]; errors name ``path``.
    Pixels outside ``valid`` (nodata, see :func:`valid_pixels`) are NaN in every band: ignored by the
    statistics, filled with the normalisation mean before resampling (:meth:`Normalisation.fill_nodata`)."""
    if bands:
        if max(bands) >= array.shape[2]:
            raise DataError(f"{path}: has {array.shape[2]} bands, band index {max(bands)} asked for")
        array = array[:, :, bands]
    return to_unit_range(match_channels(array, channels, path, key), scaling, path, valid)
