"""``codemae embed``: per-image embeddings of a folder, and a georeferenced feature map of a scene.

A folder gives one embedding per image (or optical/SAR pair): the mean of the encoder's final tokens
after resizing to the encoder's input size, optical then SAR concatenated for ``both`` (as
:func:`codemae.eval.features.extract_features` pools). A scene gives a (D, H/p, W/p) GeoTIFF on its
patch grid, computed window by window with overlap and stitched by
:func:`codemae.eval.sliding_window.sliding_window`, reading the file a strip of windows at a time.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from codemae.config import ScalingConfig, SourceConfig
from codemae.data.rasters import Scene, open_scene, rasterio, write_feature_map
from codemae.data.readers import to_unit_range
from codemae.data.sources import FolderSource
from codemae.data.transforms import Normalisation
from codemae.errors import ConfigError, DataError
from codemae.eval.device import inference_autocast, module_device
from codemae.eval.sliding_window import sliding_window, window_starts
from codemae.export import ExportedEncoder, encoder_from_checkpoint, load_encoder

STRIP_VALUES = 1 << 25  # raw values read at once from a scene (a strip of window rows)


def embedding_encoder(checkpoint: str | Path, device: str | torch.device) -> ExportedEncoder:
    """The encoder of an export folder or a pretraining checkpoint, with its training normalisation."""
    encoder = load_encoder(checkpoint) if Path(checkpoint).is_dir() else encoder_from_checkpoint(checkpoint)
    return encoder.eval().to(device)


@torch.no_grad()
def embed_folder(encoder: ExportedEncoder, root: str | Path, modality: str, out: Path, batch_size: int = 32,
                 progress: bool = True) -> dict:
    """Embeddings of every image under ``root`` (``both``: pairs ``root/opt`` + ``root/sar``) to
    ``out/embeddings.parquet`` (with pyarrow) or ``out/embeddings.npy``, and ``out/index.csv``."""
    kind = "paired" if modality == "both" else modality
    source = FolderSource(SourceConfig(name="embed", kind=kind, root=str(root), holdout=[]), encoder.encoder.channels)
    device, size = module_device(encoder), encoder.encoder.img_size
    rows = []
    for first in tqdm(range(0, len(source), batch_size), desc="batches", disable=not progress):
        samples = [source.load(i) for i in range(first, min(first + batch_size, len(source)))]
        batch = {m: torch.stack([resized(s[m], size, encoder, m) for s in samples]).to(device)
                 for m in source.modalities}
        with inference_autocast(device):
            outputs = encoder.encode(batch)
        rows.append(torch.cat([outputs[m].tokens.float().mean(1) for m in source.modalities], dim=1).cpu())
    embeddings = torch.cat(rows).numpy()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "index.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "name", *source.modalities])
        for i, files in enumerate(source.files):
            writer.writerow([i, source.stems[i], *(files[m] for m in source.modalities)])
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"name": source.stems, "embedding": list(embeddings)})
        path = out / "embeddings.parquet"
        pq.write_table(table, path)
    except ImportError:
        path = out / "embeddings.npy"
        np.save(path, embeddings)
    return {"images": len(source), "dim": embeddings.shape[1], "path": str(path), "index": str(out / "index.csv")}


def resized(array: np.ndarray, size: int, encoder: ExportedEncoder, modality: str) -> Tensor:
    """(H, W, C) [0, 1] (NaN: nodata) -> (C, size, size), nodata filled with the training mean."""
    x = fill_nodata(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1), encoder, modality)
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]


def fill_nodata(x: Tensor, encoder: ExportedEncoder, modality: str) -> Tensor:
    """NaN pixels of (C, H, W) [0, 1] values set to the training mean (0 once normalised; 0 if unknown)."""
    norm = encoder.meta["normalisation"].get(modality)
    return Normalisation(**norm).fill_nodata(x) if norm else torch.nan_to_num(x, nan=0.0)


def check_tiling(tile: int, overlap: int, patch: int) -> None:
    """Refuse (one line) a window or overlap that is not a multiple of the patch size, or overlap >= tile."""
    if tile <= 0 or tile % patch:
        raise ConfigError(f"--tile {tile}: must be a positive multiple of the patch size {patch}")
    if overlap < 0 or overlap >= tile or overlap % patch:
        raise ConfigError(f"--overlap {overlap}: must be a multiple of the patch size {patch} in [0, {tile})")


def coverage(starts: list[int], window: int, size: int) -> np.ndarray:
    """How many windows of ``window`` starting at ``starts`` cover each of ``size`` positions."""
    count = np.zeros(size, dtype=np.float64)
    for s in starts:
        count[s:s + window] += 1
    return count


@torch.no_grad()
def embed_scene(encoder: ExportedEncoder, path: str | Path, modality: str, out: Path, tile: int, overlap: int,
                batch_size: int = 8, progress: bool = True, strip_values: int = STRIP_VALUES) -> dict:
    """The scene's (D, H/p, W/p) feature map as ``out``: windows of ``tile`` pixels at stride
    ``tile - overlap``, overlaps averaged; patches whose pixels are all nodata are nodata (NaN).
    Returns what was done and notes (padding, missing georeferencing)."""
    if modality == "both":
        raise ConfigError("--modality both: a scene is one modality; embed the optical and SAR scenes apart")
    p = encoder.patch_size
    check_tiling(tile, overlap, p)
    stride = tile - overlap
    notes = []
    with open_scene(path) as scene:
        if scene.height < p or scene.width < p:
            raise DataError(f"{path}: {scene.height}x{scene.width} pixels, smaller than one patch ({p} px)")
        grid_h, grid_w = scene.height // p, scene.width // p
        height, width = grid_h * p, grid_w * p  # whole patches only: every window starts on the patch grid
        if (height, width) != (scene.height, scene.width):
            notes.append(f"the last {scene.height - height} rows and {scene.width - width} columns (part of a "
                         "patch) are left out")
        if height < tile or width < tile:
            notes.append(f"the scene ({scene.height}x{scene.width}) is smaller than one tile ({tile}): padded")
        rows = window_starts(height, tile, stride)
        per_strip = max(1, (strip_values // max(width * scene.bands, 1) - tile) // stride + 1)
        total = np.zeros((encoder.encoder.embed_dim, grid_h, grid_w), dtype=np.float32)
        seen = np.zeros((grid_h, grid_w), dtype=bool)  # patches with at least one valid pixel
        counts = coverage([y // p for y in rows], tile // p, grid_h)
        strips = [rows[i:i + per_strip] for i in range(0, len(rows), per_strip)]
        device = module_device(encoder)
        for strip in tqdm(strips, desc="strips", disable=not progress):
            top = strip[0]
            x, valid = strip_input(scene, encoder, modality, top, min(strip[-1] + tile, height) - top, width)
            with inference_autocast(device):
                features = sliding_window(lambda crops: encoder.feature_map(crops[0], modality).float(),
                                          [x.to(device)], tile, stride, out_stride=p, batch_size=batch_size)
            own = coverage([(y - top) // p for y in strip], tile // p, features.shape[1])
            g0 = top // p
            total[:, g0:g0 + features.shape[1]] += (features.cpu().numpy() * own[None, :, None]).astype(np.float32)
            seen[g0:g0 + features.shape[1]] |= valid.reshape(features.shape[1], p, grid_w, p).any((1, 3))
        features = total / counts[None, :, None].astype(np.float32)
        features[:, ~seen] = np.nan
        if not scene.georeferenced:
            notes.append("no georeferencing: " + ("the scene has none; the output grid is in pixel units"
                                                  if rasterio is not None else
                                                  "reading and writing it needs the geo extra (pip install "
                                                  "codemae[geo])"))
        out.parent.mkdir(parents=True, exist_ok=True)
        write_feature_map(out, features, scene, p)
    return {"path": str(out), "size": [grid_h, grid_w], "dim": int(features.shape[0]),
            "nodata_patches": int((~seen).sum()), "notes": notes}


def strip_input(scene: Scene, encoder: ExportedEncoder, modality: str, top: int, height: int, width: int
                ) -> tuple[Tensor, np.ndarray]:
    """Rows [top, top + height) of columns [0, width) as (C, h, w) [0, 1] values (nodata filled with the
    training mean) and the (h, w) validity mask."""
    raw, valid = scene.read(top, 0, height, width)
    channels = encoder.encoder.channels[modality]
    if raw.shape[2] != channels and not (raw.shape[2] == 1 and modality == "sar"):
        raise DataError(f"{scene.path}: has {raw.shape[2]} bands but the encoder's {modality} input takes {channels}")
    unit = to_unit_range(np.repeat(raw, channels, 2) if raw.shape[2] != channels else raw, ScalingConfig(),
                         scene.path, valid)
    x = fill_nodata(torch.from_numpy(np.ascontiguousarray(unit)).permute(2, 0, 1), encoder, modality)
    return x, valid


def output_name(scene: str | Path) -> str:
    """The feature map's file name for ``scene``: ``<stem>_features.tif``."""
    return f"{Path(scene).stem}_features.tif"
