"""The one module that opens scenes: validation, band mapping, windowed reads and scaling to [0, 1].

Scaling rule (the README quotes it): uint8 data is divided by 255. Any other data type (uint16, int16,
float) is stretched per band between the 2nd and 98th percentiles (`percentiles`) of the scene's valid
pixels, measured on a decimated read of the whole scene (at most 1024 px on the long side; GDAL uses
overviews when the file has them), so the driver never reads the full scene and every tile of a scene is
scaled alike. `scaling: range` with `value_range` fixes the same mapping for every scene.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from model.errors import UserError, first_line
from pipeline.rect import Rect
from pipeline.windows import valid_region

SAMPLE_SIDE = 1024  # long side of the decimated read used for percentile statistics


@dataclass(frozen=True)
class SceneInfo:
    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: str  # WKT
    transform: Affine
    nodata: float | None
    alpha: int | None = None  # 1-based alpha band, never fed to the model
    masked: bool = False  # an alpha band or a GDAL mask says which pixels are valid


@dataclass(frozen=True)
class Scaling:
    """value -> clip((value - low) / (high - low), 0, 1), per output channel."""

    low: tuple[float, ...]
    high: tuple[float, ...]


def is_virtual(path: str) -> bool:
    return str(path).startswith("/vsi") or "://" in str(path)


def open_scene(path: str) -> SceneInfo:
    """Metadata of a scene, or a one-line UserError naming the file and the problem."""
    path = str(path)
    if not is_virtual(path) and not os.path.exists(path):
        raise UserError(f"{path}: scene not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
        with src:
            if src.count == 0:
                raise UserError(f"{path}: the raster has no bands")
            if src.crs is None:
                raise UserError(f"{path}: the scene has no CRS (assign one, e.g. gdal_edit.py -a_srs EPSG:XXXX)")
            if src.transform == Affine.identity() and not src.gcps[0]:
                raise UserError(f"{path}: the scene has no geotransform (it is not georeferenced)")
            check_not_truncated(src, path)
            alpha = next((i + 1 for i, c in enumerate(src.colorinterp) if c == ColorInterp.alpha), None)
            masked = any(f in src.mask_flag_enums[0] for f in (MaskFlags.alpha, MaskFlags.per_dataset))
            return SceneInfo(path=path, width=src.width, height=src.height, count=src.count,
                             dtype=src.dtypes[0], crs=src.crs.to_wkt(), transform=src.transform,
                             nodata=src.nodata, alpha=alpha, masked=masked)
    except RasterioError as exc:
        raise UserError(f"{path}: not a readable raster ({first_line(exc)})") from None


def check_not_truncated(src: rasterio.DatasetReader, path: str) -> None:
    """A cut-off local GeoTIFF opens fine and fails only when a late block is read; catch it up front by
    checking that the last block of every band lies inside the file."""
    if src.driver != "GTiff" or is_virtual(path):
        return
    size = os.path.getsize(path)
    block_h, block_w = src.block_shapes[0]
    last = f"{math.ceil(src.width / block_w) - 1}_{math.ceil(src.height / block_h) - 1}"
    for band in range(1, src.count + 1):
        offset = src.get_tag_item(f"BLOCK_OFFSET_{last}", "TIFF", bidx=band)
        nbytes = src.get_tag_item(f"BLOCK_SIZE_{last}", "TIFF", bidx=band)
        if offset and nbytes and int(offset) + int(nbytes) > size:
            raise UserError(f"{path}: the file is truncated (its last block ends past the end of the file)")


def resolve_bands(bands: list[int] | None, count: int, scene: str = "the scene",
                  alpha: int | None = None) -> list[int]:
    """The three 1-based scene bands feeding the model's RGB channels: by default the first three that are
    not alpha (RGBA -> 1,2,3), or a single one three times (grey, grey + alpha)."""
    if bands is None:
        colour = [b for b in range(1, count + 1) if b != alpha]
        if len(colour) >= 3:
            return colour[:3]
        if len(colour) == 1:
            return colour * 3
        raise UserError(f"{scene}: has {len(colour)} colour bands; say which feed the model's 3 channels with "
                        f"--bands (e.g. --bands 1,2,1)")
    bad = [b for b in bands if not 1 <= b <= count]
    if bad:
        raise UserError(f"{scene}: bands {bad} do not exist (it has bands 1..{count})")
    return list(bands)


def compute_scaling(path: str, info: SceneInfo, settings: dict[str, Any], bands: list[int]) -> Scaling:
    """The scene's value -> [0, 1] mapping for each of `bands` (see the module docstring)."""
    mode = settings["scaling"]
    if mode == "auto":
        mode = "divide255" if info.dtype == "uint8" else "percentile"
    if mode == "divide255":
        return Scaling(low=(0.0,) * len(bands), high=(255.0,) * len(bands))
    if mode == "range":
        low, high = (float(v) for v in settings["value_range"])
        return Scaling(low=(low,) * len(bands), high=(high,) * len(bands))
    nodata = settings["nodata"] if settings["nodata"] is not None else info.nodata
    try:
        sample, keep, _ = read_overview(path, info, bands)
    except RasterioError as exc:
        raise UserError(f"{path}: cannot read the scene for its value statistics ({first_line(exc)})") from None
    p_low, p_high = settings["percentiles"]
    lows, highs = [], []
    for values in sample.astype(np.float64):
        values = values[keep]
        values = values[np.isfinite(values)]
        if nodata is not None:
            values = values[values != nodata]
        lo, hi = np.percentile(values, [p_low, p_high]) if values.size else (0.0, 1.0)
        lows.append(float(lo))
        highs.append(float(hi if hi > lo else lo + 1.0))
    return Scaling(low=tuple(lows), high=tuple(highs))


def read_overview(path: str, info: SceneInfo, bands: list[int],
                  max_side: int = SAMPLE_SIDE) -> tuple[np.ndarray, np.ndarray, Affine]:
    """The whole scene decimated to at most `max_side` px on its long side (GDAL reads overviews when the
    file has them): raw C x h x w values of `bands`, the bool mask of pixels an alpha band or GDAL mask
    calls valid, and the affine of that small grid."""
    scale = min(1.0, max_side / max(info.width, info.height))
    shape = (max(1, round(info.height * scale)), max(1, round(info.width * scale)))
    unique = sorted(set(bands))
    data = np.empty((len(unique), *shape), dtype=info.dtype)
    valid = np.ones(shape, dtype=bool)
    # A file without overviews is decimated from full-resolution blocks. Read one row of blocks at a time
    # with a block cache of a few such rows (a strip may straddle two), so each block is decoded once and
    # the driver never holds the scene in GDAL's cache (5 % of RAM by default, which a 20k^2 scene fills).
    with rasterio.open(path) as src:
        block_rows = src.block_shapes[0][0]
        row_of_blocks = info.width * block_rows * src.count * np.dtype(info.dtype).itemsize
    with rasterio.Env(GDAL_CACHEMAX=max(16 * 2**20, 4 * row_of_blocks)), rasterio.open(path) as src:  # bytes
        step = max(1, math.floor(block_rows * shape[0] / info.height))
        for i0 in range(0, shape[0], step):
            i1 = min(i0 + step, shape[0])
            rows_per_sample = info.height / shape[0]  # a fractional window keeps GDAL's sampling grid
            window = Window(0, i0 * rows_per_sample, info.width, (i1 - i0) * rows_per_sample)
            data[:, i0:i1] = src.read(unique, window=window, out_shape=(len(unique), i1 - i0, shape[1]))
            if info.masked:
                valid[i0:i1] = src.dataset_mask(window=window, out_shape=(i1 - i0, shape[1])) > 0
    transform = info.transform * Affine.scale(info.width / shape[1], info.height / shape[0])
    return data[[unique.index(b) for b in bands]], valid, transform


def read_window(path: str, window: Rect, bands: list[int], nodata: float | None,
                masked: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw C x H x W values of a full-size window (padded past the scene edge) and a bool `valid` mask that is
    False over padding, over pixels that are nodata in every band read and, for a `masked` scene, where its
    alpha band or GDAL mask says so (the transparent collar of an orthomosaic)."""
    with rasterio.open(path) as src:
        unique = sorted(set(bands))
        fill = nodata if nodata is not None else 0
        data = src.read(unique, window=window.to_window(), boundless=True, fill_value=fill)
        valid = valid_region(window, src.width, src.height)
        if masked:
            valid &= src.dataset_mask(window=window.to_window(), boundless=True) > 0
    raw = data[[unique.index(b) for b in bands]]
    if nodata is not None:
        valid &= ~np.all(data == nodata, axis=0) if not np.isnan(nodata) else ~np.all(np.isnan(data), axis=0)
    return raw, valid


def normalize(raw: np.ndarray, scaling: Scaling) -> np.ndarray:
    """float32 C x H x W in [0, 1]; the caller zeroes invalid pixels (it owns the valid mask)."""
    low = np.asarray(scaling.low, dtype=np.float32)[:, None, None]
    span = (np.asarray(scaling.high, dtype=np.float32) - np.asarray(scaling.low, dtype=np.float32))[:, None, None]
    out = (raw.astype(np.float32) - low) / span
    np.clip(out, 0.0, 1.0, out=out)
    np.nan_to_num(out, copy=False, nan=0.0)
    return out


def to_uint8(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A [0, 1] float image as 8-bit, black where it is not valid."""
    out = np.round(image * 255.0).astype(np.uint8)
    out[:, ~valid] = 0
    return out


def write_png(path: Path, image: np.ndarray) -> None:
    """An 8-bit C x H x W image as a plain PNG (a picture: its position, if any, is kept elsewhere)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="PNG", width=image.shape[2], height=image.shape[1],
                           count=image.shape[0], dtype="uint8") as dst:
            dst.write(image)
