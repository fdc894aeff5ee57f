"""The one module that opens scenes: validation, band mapping, which pixels are valid, windowed reads and
scaling to [0, 1].

Validity rule (the README quotes it). A pixel is not image (never fed to the model, never yields objects, left
out of the statistics) when it lies past the scene's edge (padding), when an alpha band or a GDAL mask says so,
when any band read is NaN or infinite, or when it is nodata: every band read equals its nodata value (the
`nodata` setting or --nodata, one value or one per scene band, else the value the scene declares). Lossy
compression (JPEG, 8-bit) blurs the edge of a nodata collar, so on 8-bit scenes a pixel within `NODATA_NEAR`
of the nodata value in every band read and connected to a solid region of at least `COLLAR_MIN_PX` exact
nodata pixels is nodata too, and so is a speck of at most `SPECK_PX` pixels such a collar encloses. Only a
solid region counts, so the scattered real white pixels of a scene that declares 255 as nodata keep their
neighbours. A window whose valid pixels are all one colour holds nothing to find and is skipped like an
all-nodata window.

Scaling rule: uint8 data is divided by 255. Any other data type (uint16, int16, float) is stretched per band
between the 2nd and 98th percentiles (`percentiles`) of the scene's valid pixels, measured on a decimated
read of the whole scene (at most 1024 px on the long side; GDAL uses overviews when the file has them), so
the driver never reads the full scene and every tile of a scene is scaled alike. `scaling: range` with
`value_range` fixes the same mapping for every scene.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window
from scipy import ndimage

from core.errors import UserError, first_line
from pipeline.rect import Rect

if TYPE_CHECKING:
    from pipeline.settings import Settings

SAMPLE_SIDE = 1024  # long side of the decimated read used for percentile statistics
# The decimated read decodes the scene in pieces of at most this many bytes of blocks, with a GDAL block cache
# of two pieces, so the driver's memory does not grow with the scene's width (one row of 512 px blocks of a
# 200000 px wide 3-band uint16 scene is 600 MB).
OVERVIEW_CHUNK_BYTES = 16 * 2**20
NODATA_NEAR = 32  # 8-bit: JPEG at quality 75 leaves a white collar's edge pixels up to ~25-40 off 255
COLLAR_MIN_PX = 256  # exact-nodata pixels a solid region needs to be a collar (a 16 x 16 JPEG MCU)
SPECK_PX = 64  # image specks a collar encloses up to this size (an 8 x 8 JPEG block) are collar too
COLLAR_MARGIN = 16  # px read around a window so the collar rule sees past the window's edge (one JPEG MCU)
COLLAR_MIN_FRACTION = 0.02  # share of the scene a one-colour border region needs before the run warns
EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity for scipy.ndimage.label

Nodata = tuple[float, ...] | None  # one nodata value per band read (per entry of `bands`), or none


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


def band_nodata(setting: float | list[float] | None, info: SceneInfo, bands: list[int], scene: str) -> Nodata:
    """The nodata value of each band read: the `nodata` setting (one value for every band, or one per scene
    band) over the value the scene declares; None when neither gives one."""
    if setting is None:
        return per_band(info.nodata, len(bands))
    if not isinstance(setting, (list, tuple)):
        return per_band(setting, len(bands))
    if len(setting) != info.count:
        raise UserError(f"{scene}: nodata has {len(setting)} values but the scene has {info.count} bands "
                        "(give one value for every band, or one per band)")
    return tuple(float(setting[b - 1]) for b in bands)


def per_band(nodata: float | Sequence[float] | None, n: int) -> Nodata:
    """One value for each of `n` bands read, from one value or a sequence that already has one per band."""
    if nodata is None:
        return None
    if isinstance(nodata, (int, float, np.number)):
        return (float(nodata),) * n
    return tuple(float(v) for v in nodata)


@dataclass(frozen=True)
class Overview:
    """The whole scene decimated: raw C x h x w values of the bands read, the bool mask of pixels an alpha
    band or GDAL mask calls valid, and the affine of that small grid."""

    data: np.ndarray
    valid: np.ndarray
    transform: Affine


def scaling_mode(settings: Settings, info: SceneInfo) -> str:
    """The scaling rule a scene gets: `auto` resolved by its data type."""
    mode = settings.scaling
    if mode == "auto":
        mode = "divide255" if info.dtype == "uint8" else "percentile"
    return mode


def compute_scaling(path: str, info: SceneInfo, settings: Settings, bands: list[int],
                    overview: Overview | None = None) -> Scaling:
    """The scene's value -> [0, 1] mapping for each of `bands` (see the module docstring); the percentile
    rule reads `overview` when the caller has it, else the scene."""
    mode = scaling_mode(settings, info)
    if mode == "divide255":
        return Scaling(low=(0.0,) * len(bands), high=(255.0,) * len(bands))
    if mode == "range":
        low, high = (float(v) for v in settings.value_range)
        return Scaling(low=(low,) * len(bands), high=(high,) * len(bands))
    try:
        overview = overview if overview is not None else read_overview(path, info, bands)
    except RasterioError as exc:
        raise UserError(f"{path}: cannot read the scene for its value statistics ({first_line(exc)})") from None
    keep = overview.valid & valid_pixels(overview.data, band_nodata(settings.nodata, info, bands, path))
    p_low, p_high = settings.percentiles
    lows, highs = [], []
    for values in overview.data:
        values = values[keep].astype(np.float64)
        lo, hi = np.percentile(values, [p_low, p_high]) if values.size else (0.0, 1.0)
        lows.append(float(lo))
        highs.append(float(hi if hi > lo else lo + 1.0))
    return Scaling(low=tuple(lows), high=tuple(highs))


def read_overview(path: str, info: SceneInfo, bands: list[int], max_side: int = SAMPLE_SIDE,
                  chunk_bytes: int = OVERVIEW_CHUNK_BYTES) -> Overview:
    """The whole scene decimated to at most `max_side` px on its long side (GDAL reads overviews when the
    file has them), for the statistics, the collar check and the quicklook.

    A file without overviews is decimated from full-resolution blocks. The sample is read in pieces that each
    cover one row of blocks and as many columns of blocks as `chunk_bytes` of decoded blocks hold, cut where
    GDAL's nearest-neighbour grid moves to the next block, so each block is decoded once, by one read, and
    GDAL's cache (set to two pieces) never holds more than that whatever the scene's width. Only a striped
    file whose single strip is larger than that needs more: GDAL decodes a strip whole.
    """
    scale = min(1.0, max_side / max(info.width, info.height))
    shape = (max(1, round(info.height * scale)), max(1, round(info.width * scale)))
    unique = sorted(set(bands))
    data = np.empty((len(unique), *shape), dtype=info.dtype)
    valid = np.ones(shape, dtype=bool)
    with rasterio.open(path) as src:
        block_h, block_w = src.block_shapes[0]
        block_bytes = block_h * block_w * src.count * np.dtype(info.dtype).itemsize  # a pixel-interleaved
        # block holds every band, and GDAL decodes them all at once
    blocks_per_read = max(1, chunk_bytes // block_bytes)
    rows = sample_runs(info.height, shape[0], block_h)
    cols = sample_runs(info.width, shape[1], block_w * blocks_per_read)
    ry, rx = info.height / shape[0], info.width / shape[1]  # fractional windows keep GDAL's sampling grid
    with rasterio.Env(GDAL_CACHEMAX=2 * max(chunk_bytes, block_bytes)), rasterio.open(path) as src:  # bytes
        for i0, i1 in rows:
            for j0, j1 in cols:
                window = Window(j0 * rx, i0 * ry, (j1 - j0) * rx, (i1 - i0) * ry)
                data[:, i0:i1, j0:j1] = src.read(unique, window=window, out_shape=(len(unique), i1 - i0, j1 - j0))
                if info.masked:
                    valid[i0:i1, j0:j1] = src.dataset_mask(window=window, out_shape=(i1 - i0, j1 - j0)) > 0
    transform = info.transform * Affine.scale(info.width / shape[1], info.height / shape[0])
    return Overview(data[[unique.index(b) for b in bands]], valid, transform)


def sample_runs(length: int, samples: int, span: int) -> list[tuple[int, int]]:
    """[start, stop) runs of the `samples` decimated positions along an axis of `length` pixels whose source
    pixels (GDAL's nearest-neighbour choice: the one under each sample's centre) lie in the same `span`."""
    centres = np.minimum(((np.arange(samples) + 0.5) * (length / samples)).astype(np.int64), length - 1)
    edges = [0, *(np.flatnonzero(np.diff(centres // span)) + 1).tolist(), samples]
    return list(zip(edges[:-1], edges[1:]))


def first_look(path: str, info: SceneInfo, bands: list[int], nodata: Nodata) -> tuple[Overview | None, list[str]]:
    """The driver's one decimated read of a scene, shared by the collar check and the quicklook, and the
    warnings it gives: an undeclared collar, or that the overview cannot be read (then None: a missing
    picture must not cost the user the polygons)."""
    try:
        overview = read_overview(path, info, bands)
    except RasterioError as exc:
        return None, [f"no quicklook and no collar check: the scene overview could not be read ({first_line(exc)})"]
    warning = collar_warning(path, overview, nodata, bands, info.count)
    return overview, [warning] if warning else []


def collar_warning(scene: str, overview: Overview, nodata: Nodata, bands: list[int], count: int) -> str | None:
    """The warning for an undeclared no-data collar: no nodata declared, and a region of exactly one colour
    connected to the scene's border covers at least COLLAR_MIN_FRACTION of it (orthomosaics fill the area
    outside the flight with white or black). Says which --nodata to pass; None when there is nothing to say."""
    if nodata is not None:
        return None
    found = border_region(overview.data, overview.valid & valid_pixels(overview.data, None))
    if found is None or found[1] < COLLAR_MIN_FRACTION:
        return None
    colour, share = found
    values = ",".join(f"{v:g}" for v in colour)
    return (f"{Path(scene).name}: {share:.0%} of the scene is one colour ({values}) reaching its border and no "
            f"nodata is declared, so the model reads it as image (a no-data collar?); if it is, pass "
            f"{nodata_flag(colour, bands, count)}")


def border_region(data: np.ndarray, valid: np.ndarray) -> tuple[tuple[float, ...], float] | None:
    """The colour of the largest region of exactly one colour (C x h x w `data`) connected to the grid's
    border, and its share of the valid pixels; None when no valid pixel lies on the border."""
    ring = np.zeros(valid.shape, dtype=bool)
    ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
    ring &= valid
    if not ring.any():
        return None
    colours, counts = np.unique(data[:, ring].T, axis=0, return_counts=True)
    best: tuple[tuple[float, ...], int] | None = None
    for colour in colours[np.argsort(counts)[::-1][:3]]:  # the border's commonest colours
        same = valid & np.all(data == colour[:, None, None], axis=0)
        labels, _ = ndimage.label(same)
        touching = np.unique(labels[ring & same])
        size = int(np.isin(labels, touching[touching > 0]).sum())
        if best is None or size > best[1]:
            best = (tuple(float(v) for v in colour), size)
    return None if best is None else (best[0], best[1] / int(valid.sum()))


def nodata_flag(colour: Sequence[float], bands: list[int], count: int) -> str:
    """The --nodata flag declaring `colour` (the values of `bands`) as nodata."""
    if len(set(colour)) == 1:
        return f"--nodata {colour[0]:g}"
    value = dict(zip(bands, colour))
    if set(value) == set(range(1, count + 1)):
        return "--nodata " + ",".join(f"{value[b]:g}" for b in range(1, count + 1))
    read = ", ".join(f"band {b}: {v:g}" for b, v in value.items())
    return f"--nodata with one value per band ({count} values; {read})"


def valid_pixels(data: np.ndarray, nodata: Sequence[float] | None, inside: np.ndarray | None = None) -> np.ndarray:
    """bool h x w over raw C x h x w values (`nodata`: one value per band of `data`): False where a band is
    NaN or infinite and where the pixel is nodata, as the module docstring says. `inside` marks the pixels
    that are scene (not padding); padding never counts as part of a collar."""
    valid = np.ones(data.shape[1:], dtype=bool)
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    if nodata is None:
        return valid
    exact = valid.copy() if inside is None else valid & inside
    for band, value in zip(data, nodata):
        exact &= band == value
    valid &= ~exact
    if data.dtype == np.uint8 and exact.sum() >= COLLAR_MIN_PX:
        valid &= ~collar_fringe(data, nodata, exact, inside)
    return valid


def collar_fringe(data: np.ndarray, nodata: Sequence[float], exact: np.ndarray,
                  inside: np.ndarray | None) -> np.ndarray:
    """The pixels of a lossy-compressed collar that are not exactly nodata: those within NODATA_NEAR of it in
    every band and connected to a solid region of COLLAR_MIN_PX exact-nodata pixels, and the specks of at
    most SPECK_PX pixels such a collar encloses."""
    solid_labels, _ = ndimage.label(exact, EIGHT)
    sizes = np.bincount(solid_labels.ravel())
    sizes[0] = 0
    solid = sizes[solid_labels] >= COLLAR_MIN_PX
    if not solid.any():
        return np.zeros(exact.shape, dtype=bool)
    near = np.ones(exact.shape, dtype=bool) if inside is None else inside.copy()
    for band, value in zip(data, nodata):
        near &= np.abs(band.astype(np.float32) - np.float32(value)) <= NODATA_NEAR
    labels, _ = ndimage.label(near, EIGHT)
    keep = np.unique(labels[solid])
    collar = np.isin(labels, keep[keep > 0])
    specks, _ = ndimage.label(~collar)
    small = np.bincount(specks.ravel()) <= SPECK_PX
    small[0] = False
    small[np.unique(edge_pixels(specks))] = False  # reaching the edge: not enclosed
    return collar | small[specks]


def read_window(source: str | rasterio.DatasetReader, window: Rect, bands: list[int],
                nodata: float | Sequence[float] | None, masked: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Raw C x H x W values of a full-size window (zero past the scene edge) and its bool `valid` mask (the
    module's validity rule; `nodata`: one value, or one per band read; `masked`: the scene's alpha band or GDAL
    mask counts). A window whose valid pixels are all one colour comes back all invalid: it is skipped.
    `source`: a path, or a dataset kept open across windows (opening a GeoTIFF costs a millisecond or two)."""
    nodata = per_band(nodata, len(bands))
    unique = sorted(set(bands))
    values = None if nodata is None else [dict(zip(bands, nodata))[b] for b in unique]
    margin = 0
    with rasterio.open(source) if isinstance(source, str) else contextlib.nullcontext(source) as src:
        data, inside, opaque = read_box(src, window, unique, masked)
        if values is not None and data.dtype == np.uint8 and near_on_edge(data, values, inside):
            margin = COLLAR_MARGIN  # a collar may reach the window: its rule must see past the edge
            data, inside, opaque = read_box(src, window.grown(margin), unique, masked)
    valid = inside & opaque & valid_pixels(data, values, inside)
    crop = (slice(margin, margin + window.height), slice(margin, margin + window.width))
    data, valid = data[(slice(None), *crop)], valid[crop]
    if one_colour(data, valid):
        valid[:] = False
    return data[[unique.index(b) for b in bands]], valid


def near_on_edge(data: np.ndarray, nodata: Sequence[float], inside: np.ndarray) -> bool:
    """Whether a scene pixel on the window's edge is within NODATA_NEAR of nodata: only then can the collar
    rule's verdict on the window's pixels depend on pixels outside it (the margin is read only then)."""
    near = edge_pixels(inside)
    for band, value in zip(data, nodata):
        near &= np.abs(edge_pixels(band).astype(np.float32) - np.float32(value)) <= NODATA_NEAR
    return bool(near.any())


def edge_pixels(array: np.ndarray) -> np.ndarray:
    """The values of the outermost rows and columns of a 2-D array (corners twice)."""
    return np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])


def read_box(src: rasterio.DatasetReader, window: Rect, indexes: list[int],
             masked: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bands `indexes` over an integer `window` that may reach past the scene (zero there), the bool mask of
    its pixels inside the scene, and of those the GDAL mask calls valid (all of them unless `masked`).

    A plain read of the part inside the scene: rasterio's boundless read goes through a VRT, ~10 ms a window
    against ~0.1 ms (512 px, uint8, here)."""
    c0, r0, w, h = window.col0, window.row0, window.width, window.height
    data = np.zeros((len(indexes), h, w), dtype=src.dtypes[0])
    inside = np.zeros((h, w), dtype=bool)
    opaque = np.ones((h, w), dtype=bool)
    cols = (max(c0, 0), min(c0 + w, src.width))
    rows = (max(r0, 0), min(r0 + h, src.height))
    if cols[0] < cols[1] and rows[0] < rows[1]:
        part = Window(cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0])
        at = (slice(rows[0] - r0, rows[1] - r0), slice(cols[0] - c0, cols[1] - c0))
        data[(slice(None), *at)] = src.read(indexes, window=part)
        inside[at] = True
        if masked:
            opaque[at] = src.dataset_mask(window=part) > 0
    return data, inside, opaque


def one_colour(data: np.ndarray, valid: np.ndarray) -> bool:
    """True when every valid pixel has the same value in every band: a blank fill, nothing to find."""
    return bool(valid.any()) and all(np.ptp(band[valid]) == 0 for band in data)


def normalize(raw: np.ndarray, scaling: Scaling) -> np.ndarray:
    """float32 C x H x W in [0, 1]; the caller zeroes invalid pixels (it owns the valid mask)."""
    low = np.asarray(scaling.low, dtype=np.float32)[:, None, None]
    span = (np.asarray(scaling.high, dtype=np.float32) - np.asarray(scaling.low, dtype=np.float32))[:, None, None]
    out = raw.astype(np.float32)
    out -= low
    out /= span
    np.clip(out, 0.0, 1.0, out=out)
    if raw.dtype.kind == "f":  # only float data can hold NaN (never valid data; zeroed as the rest)
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
