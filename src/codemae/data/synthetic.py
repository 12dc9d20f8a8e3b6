"""Synthetic paired optical/SAR scenes: the embedded default data, no download needed.

A land-cover map (water, vegetation, bare soil, urban, road) is rendered twice:
as optical (class colours and textures, painted road markings that SAR cannot
see, optional clouds) and as SAR (class backscatter, multiplicative gamma speckle
with L looks, bright point scatterers and layover on buildings, optional
misregistration). Everything is a pure function of the scene seed.

Bi-temporal damage pairs (:func:`generate_damage_pair`) draw the same kind of map,
render it as an optical "before" scene with every building standing and as a SAR
"after" scene in which each building is intact (bright footprint, layover and
double-bounce corners), damaged (attenuated, partly bright returns, weak layover) or
destroyed (rubble texture, no layover and no double bounce), with the label raster
0 background, 1 intact, 2 damaged, 3 destroyed on the building footprints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from codemae.config import SyntheticConfig

CLASSES = ("water", "vegetation", "bare_soil", "urban", "road")
WATER, VEGETATION, SOIL, URBAN, ROAD = range(len(CLASSES))
OPTICAL_COLOURS = np.array([
    [0.08, 0.18, 0.32],  # water
    [0.16, 0.36, 0.13],  # vegetation
    [0.58, 0.46, 0.30],  # bare soil
    [0.52, 0.50, 0.50],  # urban ground
    [0.28, 0.28, 0.30],  # road asphalt
], dtype=np.float32)
BACKSCATTER = np.array([0.008, 0.12, 0.05, 0.25, 0.015], dtype=np.float32)  # linear sigma0
BUILDING_BACKSCATTER = 0.6
SAR_DB_RANGE = (-25.0, 5.0)
DAMAGE_CLASSES = ("background", "intact", "damaged", "destroyed")
INTACT, DAMAGED, DESTROYED = 1, 2, 3
DAMAGE_PROBABILITIES = (0.5, 0.25, 0.25)  # of intact, damaged, destroyed, per building
DAMAGED_ATTENUATION = 0.3  # damaged buildings' returns relative to intact ones
DAMAGED_BRIGHT_FRACTION = 0.3  # of a damaged footprint still returning like an intact building
RUBBLE_SIGMA = 1.0  # log-normal spread of the rubble backscatter around urban ground


@dataclass
class Scene:
    """One rendered scene: optical (H, W, 3) and SAR (H, W, 1) in [0, 1], labels (H, W) class ids."""

    optical: np.ndarray
    sar: np.ndarray
    labels: np.ndarray

    @property
    def dominant_class(self) -> int:
        return int(np.bincount(self.labels.ravel(), minlength=len(CLASSES)).argmax())


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Uniform noise on a ``cells x cells`` grid, bicubically upsampled to ``size``, rescaled to [0, 1]."""
    coarse = torch.from_numpy(rng.random((1, 1, cells, cells), dtype=np.float32))
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()
    return (field - field.min()) / (np.ptp(field) + 1e-6)


def building_block(size: int) -> int:
    """Side of the grid cells that hold at most one building each."""
    return max(size // 16, 4)


def land_cover(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Class map, building mask and the road centre-line masks of one scene."""
    elevation = smooth_noise(rng, size, 4)
    moisture = smooth_noise(rng, size, 6)
    labels = np.full((size, size), VEGETATION, dtype=np.int64)
    labels[moisture > rng.uniform(0.55, 0.8)] = SOIL
    labels[elevation > np.quantile(elevation, 1.0 - rng.uniform(0.05, 0.45))] = URBAN
    labels[elevation < np.quantile(elevation, rng.uniform(0.0, 0.3))] = WATER
    buildings = np.zeros((size, size), dtype=bool)
    block = building_block(size)
    for y in range(0, size - block, block):
        for x in range(0, size - block, block):
            if labels[y + block // 2, x + block // 2] == URBAN and rng.random() < 0.7:
                h, w = rng.integers(block // 3, block - 1, size=2)
                buildings[y + 1 : y + 1 + h, x + 1 : x + 1 + w] = True
    centre_lines = []
    for _ in range(rng.integers(1, 4)):
        line = np.zeros((size, size), dtype=bool)
        pos, width = rng.integers(0, size), rng.integers(2, 5)
        if rng.random() < 0.5:
            line[pos, :] = True
            road = slice(max(pos - width // 2, 0), pos + width // 2 + 1), slice(None)
        else:
            line[:, pos] = True
            road = slice(None), slice(max(pos - width // 2, 0), pos + width // 2 + 1)
        labels[road] = np.where(labels[road] == WATER, WATER, ROAD)
        buildings[road] = False
        centre_lines.append(line & (labels == ROAD))
    return labels, buildings, centre_lines


def render_optical(rng: np.random.Generator, labels: np.ndarray, buildings: np.ndarray,
                   centre_lines: list[np.ndarray], cfg: SyntheticConfig) -> np.ndarray:
    size = labels.shape[0]
    image = OPTICAL_COLOURS[labels].copy()
    texture = 1.0 + 0.25 * (smooth_noise(rng, size, size // 4) - 0.5) + 0.08 * rng.standard_normal((size, size))
    image *= texture[:, :, None].astype(np.float32)
    roof = rng.uniform(0.35, 0.85, size=3).astype(np.float32)
    image[buildings] = roof
    steps = np.arange(size) // 4
    dashes = (steps[:, None] + steps[None, :]) % 2 == 0  # dashed along any row or column
    for line in centre_lines:
        if rng.random() < cfg.marking_density:
            image[line & dashes] = 0.95
    if cfg.cloud_cover > 0:
        clouds = smooth_noise(rng, size, 5)
        alpha = np.clip((clouds - (1.0 - cfg.cloud_cover)) * 4.0, 0.0, 1.0)[:, :, None]
        image = image * (1 - alpha) + 0.95 * alpha
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def standing_returns(rng: np.random.Generator, sigma: np.ndarray, buildings: np.ndarray, strength: float,
                     corner_probability: float) -> None:
    """Paint standing buildings into ``sigma`` in place: footprint and layover (towards the sensor, to
    the left) at ``strength``, double-bounce corners x20 with ``corner_probability``."""
    size = sigma.shape[0]
    layover = max(size // 64, 1)
    sigma[np.roll(buildings, -layover, axis=1) | buildings] = strength
    corners = buildings & ~np.roll(buildings, 1, axis=0) & ~np.roll(buildings, 1, axis=1)
    sigma[corners & (rng.random((size, size)) < corner_probability)] *= 20.0


def render_sar(rng: np.random.Generator, labels: np.ndarray, buildings: np.ndarray,
               cfg: SyntheticConfig) -> np.ndarray:
    sigma = BACKSCATTER[labels].copy()
    standing_returns(rng, sigma, buildings, BUILDING_BACKSCATTER, 0.5)
    return sar_image(rng, sigma, cfg)


def sar_image(rng: np.random.Generator, sigma: np.ndarray, cfg: SyntheticConfig) -> np.ndarray:
    """Backscatter map -> speckled, optionally misregistered SAR image (H, W, 1) in dB scaled to [0, 1]."""
    size = sigma.shape[0]
    speckle = rng.gamma(cfg.speckle_looks, 1.0 / cfg.speckle_looks, size=(size, size)).astype(np.float32)
    intensity = sigma * speckle
    if cfg.misregistration:
        dy, dx = rng.integers(-cfg.misregistration, cfg.misregistration + 1, size=2)
        intensity = np.roll(intensity, (int(dy), int(dx)), axis=(0, 1))
    lo, hi = SAR_DB_RANGE
    db = 10.0 * np.log10(np.maximum(intensity, 1e-6))
    return np.clip((db - lo) / (hi - lo), 0.0, 1.0)[:, :, None].astype(np.float32)


def generate_scene(seed: int, cfg: SyntheticConfig) -> Scene:
    """Render scene ``seed``; the same seed and config always give the same arrays."""
    rng = np.random.default_rng(seed)
    labels, buildings, centre_lines = land_cover(rng, cfg.image_size)
    optical = render_optical(rng, labels, buildings, centre_lines, cfg)
    sar = render_sar(rng, labels, buildings, cfg)
    return Scene(optical, sar, labels)


@dataclass
class DamagePair:
    """One bi-temporal scene: optical before (H, W, 3) and SAR after (H, W, 1) in [0, 1], and the
    damage labels (H, W): 0 background, 1 intact, 2 damaged, 3 destroyed."""

    optical: np.ndarray
    sar: np.ndarray
    target: np.ndarray


def damage_states(rng: np.random.Generator, buildings: np.ndarray) -> np.ndarray:
    """One state (intact / damaged / destroyed) per building, drawn per grid cell, on its footprint."""
    size = buildings.shape[0]
    block = building_block(size)
    cells = -(-size // block)
    states = rng.choice([INTACT, DAMAGED, DESTROYED], size=(cells, cells), p=DAMAGE_PROBABILITIES)
    rows = np.arange(size) // block
    return np.where(buildings, states[rows[:, None], rows[None, :]], 0).astype(np.int64)


def render_sar_after(rng: np.random.Generator, labels: np.ndarray, target: np.ndarray,
                     cfg: SyntheticConfig) -> np.ndarray:
    """The post-event SAR scene: destroyed footprints as rubble, damaged ones attenuated and partly
    bright, intact ones as in :func:`render_sar`."""
    size = labels.shape[0]
    sigma = BACKSCATTER[labels].copy()
    destroyed, damaged = target == DESTROYED, target == DAMAGED
    rubble = BACKSCATTER[URBAN] * rng.lognormal(0.0, RUBBLE_SIGMA, size=(size, size)).astype(np.float32)
    sigma[destroyed] = rubble[destroyed]
    standing_returns(rng, sigma, damaged, DAMAGED_ATTENUATION * BUILDING_BACKSCATTER, 0.1)
    sigma[damaged & (rng.random((size, size)) < DAMAGED_BRIGHT_FRACTION)] = BUILDING_BACKSCATTER
    standing_returns(rng, sigma, target == INTACT, BUILDING_BACKSCATTER, 0.5)
    return sar_image(rng, sigma, cfg)


def generate_damage_pair(seed: int, cfg: SyntheticConfig) -> DamagePair:
    """Render bi-temporal scene ``seed``; the same seed and config always give the same arrays."""
    rng = np.random.default_rng(seed)
    labels, buildings, centre_lines = land_cover(rng, cfg.image_size)
    optical = render_optical(rng, labels, buildings, centre_lines, cfg)
    target = damage_states(rng, buildings)
    return DamagePair(optical, render_sar_after(rng, labels, target, cfg), target)
