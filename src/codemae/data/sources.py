"""Data sources: folders in the folder or reference layout, and synthetic scenes.

A source lists its samples when built (so a missing file, an incomplete pair or a
split list naming an absent image is reported before training starts) and loads
one sample as a dict of float32 (H, W, C) arrays in [0, 1], one per modality.
Listing (:mod:`codemae.data.listing`) is separate from loading so ``codemae data
check`` can report every problem of a tree instead of stopping at the first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from codemae.config import SourceConfig
from codemae.data.listing import Listing, list_source, source_name, source_root
from codemae.data.rasters import open_scene, rasterio
from codemae.data.readers import TIFF_MAGIC, band_indices, read_header, read_raster, unit_array, valid_pixels
from codemae.data.synthetic import generate_scene
from codemae.errors import DataError

SCALING_KEYS = {"opt": "opt_scaling", "sar": "sar_scaling"}
CHANNEL_KEYS = {"opt": "model.opt_channels", "sar": "model.sar_channels"}


class Source:
    """A list of samples of one or both modalities."""

    name: str
    modalities: tuple[str, ...]
    stems: list[str]  # one identifier per sample, in order

    @property
    def paired(self) -> bool:
        return len(self.modalities) == 2

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


class FolderSource(Source):
    """Images on disk in the folder or reference layout (see :class:`SourceConfig`), with
    band picks and optional tiling of large scenes into ``tile``-pixel samples."""

    def __init__(self, cfg: SourceConfig, channels: dict[str, int], data_root: str = "") -> None:
        self.cfg = cfg
        self.name = source_name(cfg)
        self.channels = channels
        listing = list_source(cfg, source_root(cfg, data_root))
        if listing.problems:
            more = len(listing.problems) - 1
            raise DataError(listing.problems[0] + (f" (and {more} more; `codemae data check` lists them)"
                                                   if more else ""))
        self.modalities = listing.modalities
        self.files = listing.files
        self.tiles = self._tiles(listing) if cfg.tile else [(i, 0, 0) for i in range(len(listing.files))]
        self.stems = [listing.stems[i] + (f"@{y}_{x}" if cfg.tile else "") for i, y, x in self.tiles]
        self._decoded: dict[str, tuple[Path, np.ndarray]] = {}
        self._windowed: dict[Path, bool] = {}

    def _tiles(self, listing: Listing) -> list[tuple[int, int, int]]:
        """(file, top, left) of every full tile, from the image headers."""
        size = self.cfg.tile
        tiles = []
        for i, files in enumerate(listing.files):
            header, *others = [read_header(files[m]) for m in self.modalities]
            for m, other in zip(self.modalities[1:], others):  # tiles are cut by window: check the pair whole
                if (other.height, other.width) != (header.height, header.width):
                    raise DataError(f"pair '{listing.stems[i]}': optical {files['opt']} is {header.width}x"
                                    f"{header.height} but SAR {files[m]} is {other.width}x{other.height}")
            tiles += [(i, y, x) for y in range(0, max(header.height - size, 0) + 1, size)
                      for x in range(0, max(header.width - size, 0) + 1, size)]
        return tiles

    def __len__(self) -> int:
        return len(self.tiles)

    def window(self, modality: str, path: Path, box: tuple[int, int, int, int]) -> np.ndarray:
        """One tile: a windowed read of a TIFF with the ``geo`` extra (rasterio), else a crop of the
        decoded image, of which each worker keeps the last one per modality (so a scene's consecutive
        tiles decode it once)."""
        if self.windowable(path):
            return load_source_window(self.cfg, self.channels, modality, path, box)
        if self._decoded.get(modality, (None,))[0] != path:
            self._decoded[modality] = (path, load_source_image(self.cfg, self.channels, modality, path))
        top, left, height, width = box
        return self._decoded[modality][1][top:top + height, left:left + width]

    def windowable(self, path: Path) -> bool:
        """Whether rasterio reads ``path`` as tifffile does (a GeoTIFF, not a stack of pages), checked once."""
        if path not in self._windowed:
            same = rasterio is not None and is_tiff(path)
            if same:
                header = read_header(path)
                with open_scene(path) as scene:
                    same = (scene.height, scene.width, scene.bands, scene.dtype) == \
                        (header.height, header.width, header.bands, header.dtype)
            self._windowed[path] = same
        return self._windowed[path]

    def load(self, index: int) -> dict[str, np.ndarray]:
        file, top, left = self.tiles[index]
        files = self.files[file]
        if self.cfg.tile:
            size = self.cfg.tile
            arrays = {m: self.window(m, path, (top, left, size, size)) for m, path in files.items()}
        else:
            arrays = {m: load_source_image(self.cfg, self.channels, m, path) for m, path in files.items()}
        if self.paired and arrays["opt"].shape[:2] != arrays["sar"].shape[:2]:
            raise DataError(
                f"pair '{self.stems[index]}': optical {files['opt']} is {_size(arrays['opt'])} "
                f"but SAR {files['sar']} is {_size(arrays['sar'])}"
            )
        return arrays

class SyntheticSource(Source):
    """Generated paired scenes (see :mod:`codemae.data.synthetic`), scene ``i`` seeded by ``seed + i``."""

    modalities = ("opt", "sar")

    def __init__(self, cfg: SourceConfig, channels: dict[str, int]) -> None:
        self.cfg = cfg
        self.name = source_name(cfg)
        self.channels = channels
        if channels["opt"] != 3:
            raise DataError(f"source '{self.name}': synthetic scenes are RGB; set model.opt_channels=3")

    def __len__(self) -> int:
        return self.cfg.synthetic.num_scenes

    @property
    def stems(self) -> list[str]:
        return [str(i) for i in range(len(self))]

    def load(self, index: int) -> dict[str, np.ndarray]:
        scene = generate_scene(self.cfg.seed + index, self.cfg.synthetic)
        sar = np.repeat(scene.sar, self.channels["sar"], axis=2)
        return {"opt": scene.optical, "sar": sar}


def load_source_image(cfg: SourceConfig, channels: dict[str, int], modality: str, path: Path | bytes,
                      name: str | None = None) -> np.ndarray:
    """One image of ``modality`` (a path, or bytes called ``name``) as [0, 1] values with the
    source's band picks, the configured channel count and the source's scaling."""
    raw, nodata = read_raster(path, name)
    label = name or str(path)
    picks = getattr(cfg, f"{modality}_bands")
    bands = band_indices(picks, getattr(cfg, f"{modality}_band_names"), raw.shape[2], label) if picks else None
    valid = valid_pixels(raw, nodata) if nodata is not None else None
    return unit_array(raw, getattr(cfg, SCALING_KEYS[modality]), channels[modality], label,
                      CHANNEL_KEYS[modality], bands, valid)


def load_source_window(cfg: SourceConfig, channels: dict[str, int], modality: str, path: Path,
                       box: tuple[int, int, int, int]) -> np.ndarray:
    """The (top, left, height, width) ``box`` of one image read by window (rasterio), as
    :func:`load_source_image` reads the whole image."""
    with open_scene(path) as scene:
        raw, valid = scene.read(*box)
    picks = getattr(cfg, f"{modality}_bands")
    bands = band_indices(picks, getattr(cfg, f"{modality}_band_names"), raw.shape[2], str(path)) if picks else None
    return unit_array(raw, getattr(cfg, SCALING_KEYS[modality]), channels[modality], str(path),
                      CHANNEL_KEYS[modality], bands, None if valid.all() else valid)


def build_source(cfg: SourceConfig, channels: dict[str, int], data_root: str = "") -> Source:
    if cfg.kind == "synthetic":
        source: Source = SyntheticSource(cfg, channels)
    else:
        source = FolderSource(cfg, channels, data_root)
    if len(source) == 0:
        raise DataError(f"source '{source.name}': no samples (root {cfg.root or '-'}, split {cfg.split})")
    return source


def is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in TIFF_MAGIC


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"
