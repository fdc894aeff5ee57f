"""Quicklook PNG beside the output, ready to go into a report as it is: the scene's overview with the polygons
outlined in their class colours, the scene's name, the object count, a legend (colour, class, count) and a
scale bar in ground metres.

The overview and the outlines live on a canvas of at most `max_side` px, drawn batch by batch as the polygons
are written, so the picture costs the same whatever the scene size or the number of objects; the page is laid
out around the finished canvas, 1:1 and never resampled, with its captions and the bar.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from PIL import Image, ImageDraw, ImageFont
from pyproj import CRS, Transformer

from core.cluster import SideCall
from core.files import atomic_path
from pipeline.raster import Overview, Scaling, SceneInfo, normalize, read_overview, to_uint8
from pipeline.style import PALETTE, class_colour, label_name

DPI = 100
HEADER_PX = 64  # above the map: scene name, object count, CRS and resolution
PANEL_PX = 260  # right of the map: the legend
MARGIN_PX = 12  # left of and below the map, which has a thin frame (white fill would melt into the page)
ROW_PX = 24  # one legend row
LEGEND_ROWS = 14  # the rest of the classes are summed in one more row
DRAW_CHUNK = 256  # polygons outlined at once: their samples fit in memory the allocator reuses (a whole batch's
                  # fresh arrays cost page faults, twice the time of the drawing)


@dataclass(frozen=True)
class Caption:
    """Everything written around and on the canvas, as plain data."""

    title: str  # the scene's name
    subtitle: str  # object count, CRS, ground resolution
    legend: list[tuple[str, tuple[int, int, int] | None, int]]  # (class name, outline colour, objects)
    scale: tuple[float, str] | None  # scale bar: length in canvas px and its label; None without an ellipsoid


class Quicklook:
    """`Quicklook(scene, info, bands, scaling, class_names=...)`, `.draw(wkb, class_ids)` per batch of polygons
    (WKB, in the scene's CRS), `.save(path)`. `overview`: the scene's decimated read when the caller has it.
    `side`: where the outlines and the page are computed (`RayPool.side` in a run; by default here)."""

    IN_FLIGHT = 2  # batches outlined at once elsewhere; the output thread paints a batch when more are out

    def __init__(self, scene: str, info: SceneInfo, bands: list[int], scaling: Scaling,
                 class_names: Sequence[str] | None = None, overview: Overview | None = None, max_side: int = 1024,
                 side: Callable[..., SideCall] = SideCall.here):
        self.side = side
        self.overview = overview if overview is not None else read_overview(scene, info, bands, max_side)
        self.scaling = scaling
        self.transform = self.overview.transform
        self.classes = np.zeros(self.overview.valid.shape, dtype=np.int32)  # class id of an outline pixel, 0: none
        self.counts: Counter[int] = Counter()
        self.name = Path(scene).name
        self.class_names = list(class_names) if class_names else None
        self.drawing: list[SideCall] = []  # outlines being found, oldest first
        # The caption's facts that do not change as outlines come (the CRS database's first use costs ~0.2 s
        # of CPU): found now, mid-job, not at the job's end where every tenth of a second is the GPUs' idle time.
        height, width = self.classes.shape
        self.per_px = ground_metres_per_pixel(self.transform, info.crs, width, height)
        resolution = ground_metres_per_pixel(info.transform, info.crs, info.width, info.height)
        crs = CRS.from_wkt(info.crs)
        epsg = crs.to_epsg()
        self.facts = [f"EPSG:{epsg}" if epsg else crs.name] + ([f"{resolution:.3g} m/px"] if resolution else [])
        self.facts.append(f"{info.width:,} x {info.height:,} px")

    def draw(self, wkb: Sequence[bytes], class_ids: Sequence[int]) -> None:
        """Outline a batch of polygons. Parsing and sampling them (`outlines`) costs about as much as writing
        them: in a run it runs on a model worker's side thread, off the process that feeds the model workers,
        and the pixels come back; batches are painted in the order they came (a later outline wins a pixel)."""
        parts = (list(wkb), np.asarray(class_ids, dtype=np.int64), self.transform, self.classes.shape)
        self.drawing.append(self.side(outlines, *parts))
        self.finish_drawing(keep=self.IN_FLIGHT)

    def paint(self, found: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
        rows, cols, ids, drawn = found
        self.classes[rows, cols] = ids
        self.counts.update(drawn.tolist())

    def finish_drawing(self, keep: int = 0) -> None:
        """Paint the outlines found so far, oldest first, until at most `keep` batches are still out."""
        while len(self.drawing) > keep:
            self.paint(self.drawing.pop(0).result())

    def canvas(self) -> np.ndarray:
        """The overview with the outlines, 3 x h x w uint8."""
        self.finish_drawing()
        return canvas(self.overview, self.scaling, self.classes)

    def caption(self) -> Caption:
        self.finish_drawing()
        total = sum(self.counts.values())
        facts = [f"{total:,} object{'s' if total != 1 else ''}", *self.facts]
        return Caption(title=self.name, subtitle="  ·  ".join(facts),
                       legend=legend_rows(self.counts, self.class_names),
                       scale=scale_bar(self.per_px, self.classes.shape[1]) if self.per_px else None)

    def save(self, path: Path) -> None:
        """Compose the picture, lay out the page and write it. In a run both happen on a model worker's side
        thread: scaling the overview to 8 bits and the layout cost 0.05-0.2 s of CPU per page, which the
        driver of a many-scene job, feeding GPUs, cannot spare. The PNG's bytes come back; this process
        writes the file."""
        caption = self.caption()  # every batch painted
        png = self.side(page, self.overview, self.scaling, self.classes, caption).result()
        with atomic_path(path) as tmp:
            tmp.write_bytes(png)


def canvas(overview: Overview, scaling: Scaling, classes: np.ndarray) -> np.ndarray:
    """The overview in 8 bits with the outlines painted in their class colours (`classes`: the class id of
    each outline pixel, 0 for none), 3 x h x w uint8."""
    rgb = to_uint8(normalize(overview.data, scaling), overview.valid)
    drawn = classes > 0
    rgb[:, drawn] = PALETTE[(classes[drawn] - 1) % len(PALETTE)].T
    return rgb


def page(overview: Overview, scaling: Scaling, classes: np.ndarray, caption: Caption) -> bytes:
    """The quicklook page as PNG bytes."""
    buffer = io.BytesIO()
    render(canvas(overview, scaling, classes), caption).save(buffer, format="png", dpi=(DPI, DPI))
    return buffer.getvalue()


def outlines(wkb: list[bytes], class_ids: np.ndarray, transform: Affine,
             shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The outline pixels of a batch of polygons (WKB) on a canvas of `shape`: (rows, cols, class id of each),
    and the class ids of the polygons drawn (the empty ones are not), for the legend's counts."""
    geoms = shapely.from_wkb(wkb) if wkb else np.zeros(0, dtype=object)
    present = ~shapely.is_empty(geoms)
    geoms, class_ids = geoms[present], class_ids[present]
    found = [(np.zeros(0, np.int64),) * 3]
    for start in range(0, len(geoms), DRAW_CHUNK):
        part = slice(start, start + DRAW_CHUNK)
        rows, cols, owner = outline_pixels(geoms[part], transform, shape)
        found.append((rows, cols, class_ids[part][owner]))
    rows, cols, ids = (np.concatenate(column) for column in zip(*found))
    return rows, cols, ids, class_ids


def outline_pixels(geoms: np.ndarray, transform: Affine,
                   shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The canvas pixels (rows, cols) under the outlines of polygons in map coordinates, and the polygon each
    belongs to: every ring's segments sampled every half canvas pixel, all polygons at once in numpy (a
    rasterize call per batch walked every vertex in Python: 150 us per object, more than writing it)."""
    lines, owner = shapely.get_parts(shapely.boundary(geoms), return_index=True)
    xy, line = shapely.get_coordinates(lines, return_index=True)
    cols, rows = ~transform * (xy[:, 0], xy[:, 1])
    same = line[1:] == line[:-1]  # consecutive corners of one ring: a segment
    x0, y0, x1, y1 = cols[:-1][same], rows[:-1][same], cols[1:][same], rows[1:][same]
    # Samples at t = k / steps, k < steps: at most half a pixel apart; a segment's end is the next one's start
    # (rings are closed), and a segment shorter than half a pixel (a pixel-edge outline on a decimated
    # canvas: most of them) costs one sample.
    steps = np.maximum(np.ceil(2 * np.maximum(np.abs(x1 - x0), np.abs(y1 - y0))), 1).astype(np.int64)
    segment = np.repeat(np.arange(steps.size), steps)
    t = (np.arange(segment.size) - np.repeat(np.cumsum(steps) - steps, steps)) / np.repeat(steps, steps)
    c = np.floor(x0[segment] + t * (x1 - x0)[segment]).astype(np.int64)
    r = np.floor(y0[segment] + t * (y1 - y0)[segment]).astype(np.int64)
    inside = (r >= 0) & (r < shape[0]) & (c >= 0) & (c < shape[1])
    return r[inside], c[inside], owner[line[:-1][same]][segment][inside]


def legend_rows(counts: Counter[int], names: Sequence[str] | None) -> list[tuple[str, tuple[int, int, int] | None, int]]:
    """One row per class, named classes first (also those with no object), in class-id order; past
    LEGEND_ROWS, the rarest classes are summed in a last row without colour."""
    named = range(1, len(names) + 1) if names else range(0)
    ids = sorted(set(counts) | set(named))
    rows = [(label_name(names, i), class_colour(i), counts[i]) for i in ids]
    if len(rows) <= LEGEND_ROWS:
        return rows
    kept = sorted(sorted(range(len(rows)), key=lambda k: -rows[k][2])[:LEGEND_ROWS - 1])
    rest = [rows[k] for k in range(len(rows)) if k not in kept]
    return [rows[k] for k in kept] + [(f"{len(rest)} more classes", None, sum(r[2] for r in rest))]


def ground_metres_per_pixel(transform: Affine, crs: str, width: int, height: int) -> float | None:
    """Ground metres per pixel along a row across the middle of a width x height grid, measured on the CRS's
    ellipsoid: right in metres, feet, degrees and Web Mercator alike (whose 'metres' are 1/cos(latitude)
    too short). None for a CRS without an ellipsoid (a local engineering CRS)."""
    crs = CRS.from_user_input(crs)
    if crs.geodetic_crs is None:
        return None
    (x0, y0), (x1, y1) = transform * (width / 4, height / 2), transform * (3 * width / 4, height / 2)
    lons, lats = Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True).transform([x0, x1], [y0, y1])
    _, _, distance = crs.get_geod().inv(lons[0], lats[0], lons[1], lats[1])
    return float(distance) / (width / 2) if distance > 0 else None


def scale_bar(metres_per_px: float, width_px: int) -> tuple[float, str]:
    """The longest bar of 1, 2 or 5 x 10^k metres that fits in a fifth of the canvas: its length in px, its label."""
    target = metres_per_px * width_px / 5
    unit = 10.0 ** math.floor(math.log10(target))
    metres = max(m * unit for m in (1, 2, 5) if m * unit <= target * (1 + 1e-9))
    label = f"{metres / 1000:g} km" if metres >= 1000 else f"{float(f'{metres:.6g}'):g} m"
    return metres / metres_per_px, label


def render(rgb: np.ndarray, caption: Caption) -> Image.Image:
    """The page: header (name, facts) above the canvas, legend right of it, scale bar on it. The canvas is
    pasted pixel for pixel, so outlines stay one pixel wide and exact. Drawn with Pillow: matplotlib's import
    and first figure cost ~0.6 s of CPU in each fresh process (every job's last page), Pillow's ~0.05 s."""
    height, width = rgb.shape[1:]
    body = max(height, 40 + ROW_PX * len(caption.legend))
    page_w, page_h = MARGIN_PX + width + PANEL_PX, HEADER_PX + body + MARGIN_PX
    left, top, bottom = MARGIN_PX, HEADER_PX, HEADER_PX + height  # the map's place on the page
    pixels = np.full((page_h, page_w, 3), 255, dtype=np.uint8)
    pixels[top:bottom, left:left + width] = rgb.transpose(1, 2, 0)
    if caption.scale is not None:  # the scale bar's box: the imagery shows through a fifth, as on a map
        length, label = caption.scale
        x0, y0 = left + 16, bottom - 16  # the bar's bottom left corner
        box = pixels[y0 - 32:y0 + 8, x0 - 8:round(x0 + length) + 8]
        box[:] = (box * 0.2 + 255 * 0.8).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.rectangle((left - 1, top - 1, left + width, bottom), outline=(136, 136, 136))  # 1 px, just outside

    draw.text((left, 10), caption.title, fill="black", font=font(15, bold=True), anchor="lt")
    draw.text((left, 40), caption.subtitle, fill=(51, 51, 51), font=font(10), anchor="lt")

    legend_x, legend_y = left + width + 16, top + 12
    draw.text((legend_x, legend_y), "Classes", fill="black", font=font(11, bold=True), anchor="lt")
    for k, (name, colour, count) in enumerate(caption.legend):
        y = legend_y + 24 + k * ROW_PX  # the row's swatch top
        if colour is not None:
            tint = tuple(round(c * 0.25 + 255 * 0.75) for c in colour)
            draw.rectangle((legend_x, y, legend_x + 16, y + 16), fill=tint, outline=colour, width=2)
        draw.text((legend_x + 26, y + 8), name, fill="black", font=font(10), anchor="lm")
        draw.text((page_w - 14, y + 8), f"{count:,}", fill="black", font=font(10), anchor="rm")

    if caption.scale is not None:
        for k in range(2):  # two halves, black and white, outlined: readable on any imagery
            a, b = x0 + k * length / 2, x0 + (k + 1) * length / 2
            draw.rectangle((round(a), y0 - 6, round(b), y0), fill="black" if k == 0 else "white", outline="black")
        draw.text((x0 + length / 2, y0 - 10), label, fill="black", font=font(10), anchor="md")
    return image


@functools.cache
def font(points: float, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib, found without importing it) at `points` on a DPI page; Pillow's
    own font where that is missing."""
    size = round(points * DPI / 72)
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / f"DejaVuSans{'-Bold' if bold else ''}.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)
