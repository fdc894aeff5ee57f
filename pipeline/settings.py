"""Pipeline settings: `configs/pipeline.yaml` (or `--config`) merged over these defaults, then the flags given.

They are parsed once, into a frozen `Settings` (one dataclass per section), by `load_settings`, which both the
command line and `run_scene(**options)` call; the rest of the pipeline reads attributes, never keys. Every
setting has a command-line flag and every flag of `run` and `prepare` that changes a result has a setting
(pipeline/cli.py `setting`), so a run is reproducible from one YAML file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.yaml_files import layered
from pipeline.writers import FORMATS

SCALINGS = ("auto", "divide255", "percentile", "range")  # see pipeline/raster.py
PRECISIONS = ("auto", "float32", "float16", "bfloat16")  # cuda only: autocast of the whole forward


@dataclass(frozen=True)
class PrepareSettings:
    class_field: str | None = None  # label attribute holding the class name
    class_name: str | None = None  # or one class name for every label
    min_area_px: float = 16.0  # clipped objects smaller than this area (pixels) are dropped
    empty_fraction: float = 0.1  # fraction of label-free tiles kept (negatives)
    val_fraction: float = 0.2
    block_tiles: int = 2  # spatial split block edge, in tiles
    seed: int = 0
    # How the cutting runs, never what it produces (left out of resume keys and summary.json):
    workers: int | None = None  # parallel Ray tasks; None: this process alone, or every CPU of the cluster
    ray_address: str | None = None  # None: this machine; "auto" or "HOST:PORT": an existing Ray cluster


@dataclass(frozen=True)
class RunSettings:
    batch_size: int | None = None  # tiles per model forward; None: 2 on the CPU, 8 on a GPU (set by validate)
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    device: str = "cpu"  # cpu | cuda
    precision: str = "auto"  # cuda only: auto (the checkpoint's model.amp) | float32 | float16 | bfloat16
    ray_address: str | None = None  # None: in-process local Ray; "auto" or "HOST:PORT": an existing cluster
    workers: int = 1
    gpus_per_worker: float = 1.0  # used only with device cuda
    threads_per_worker: int | None = None  # torch threads per worker; None: cores / workers
    batches_in_flight: int = 2  # per worker: bounds memory whatever the scene size
    min_area: float = 0.0  # objects under this many square metres (true area) are left out
    simplify: float = 0.0  # polygon simplification tolerance in pixels (0: exact pixel outlines)
    format: str = "gpkg"  # outputs named after their scenes (--out-dir): gpkg | parquet | fgb | shp | geojson
    layer: str | None = None  # GeoPackage layer name (and FlatGeobuf's, GeoJSON's name); None: the scene's name
    quicklook: bool = True  # OUTPUT.quicklook.png: the scene overview with the polygons outlined
    checkpoint: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class MergeSettings:
    iou_threshold: float = 0.5  # mask IoU inside the shared part of two windows
    ios_threshold: float = 0.8  # or intersection over the smaller mask there
    class_agnostic: bool = True  # views of different classes can be one object (a model's confusion at seams)
    edge_margin: int = 2  # a view this close (pixels) to an inner edge of its window may be cut there


@dataclass(frozen=True)
class Settings:
    tile: int = 512  # window size in pixels (square)
    overlap: int = 64  # pixels shared by neighbouring windows
    bands: list[int] | None = None  # 1-based scene bands for the model's 3 channels; None: [1, 2, 3] or [1, 1, 1]
    scaling: str = "auto"  # auto | divide255 | percentile | range  (see pipeline/raster.py)
    percentiles: list[float] = field(default_factory=lambda: [2.0, 98.0])  # for percentile, and auto on non-8-bit
    value_range: list[float] | None = None  # [low, high] for scaling: range (same scaling for every scene)
    min_part_px: int = 4  # parts of a multipart object under this many pixels are dropped (specks)
    nodata: float | list[float] | None = None  # over the scene's declared nodata: one number, or one per band
    prepare: PrepareSettings = field(default_factory=PrepareSettings)
    run: RunSettings = field(default_factory=RunSettings)
    merge: MergeSettings = field(default_factory=MergeSettings)

    def to_dict(self) -> dict[str, Any]:
        """As in the config file (what run reports and fingerprints record)."""
        return dataclasses.asdict(self)


DEFAULTS: dict[str, Any] = Settings().to_dict()


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Defaults <- YAML file <- overrides (flags the user actually gave), checked, as one frozen object."""
    given = layered(DEFAULTS, path, overrides)
    validate(given)
    return Settings(**{key: value for key, value in given.items() if key not in ("prepare", "run", "merge")},
                    prepare=PrepareSettings(**given["prepare"]), run=RunSettings(**given["run"]),
                    merge=MergeSettings(**given["merge"]))


def validate(s: dict[str, Any]) -> None:
    """Refuse impossible options before any work starts."""
    check_types(DEFAULTS, s)  # types first, so no range check below meets a string
    tile, overlap = s["tile"], s["overlap"]
    if not isinstance(tile, int) or not 32 <= tile <= 8192:
        raise UserError(f"tile must be an integer number of pixels in [32, 8192], got {tile!r}")
    if not isinstance(overlap, int) or overlap < 0 or overlap >= tile:
        raise UserError(f"overlap must be an integer in [0, tile) = [0, {tile}), got {overlap!r}")
    if s["bands"] is not None:
        if not isinstance(s["bands"], list) or len(s["bands"]) != 3 or not all(
            isinstance(b, int) and b >= 1 for b in s["bands"]
        ):
            raise UserError(f"bands must be three 1-based band numbers, got {s['bands']!r}")
    nodata = s["nodata"] if isinstance(s["nodata"], list) else [s["nodata"]]
    if s["nodata"] is not None and not (nodata and all(type(v) in (int, float) for v in nodata)):
        raise UserError(f"nodata must be a number or a list of one number per band, got {s['nodata']!r}")
    if s["scaling"] not in SCALINGS:
        raise UserError(f"scaling must be auto, divide255, percentile or range, got {s['scaling']!r}")
    low, high = s["percentiles"]
    if not 0 <= low < high <= 100:
        raise UserError(f"percentiles must satisfy 0 <= low < high <= 100, got {s['percentiles']!r}")
    if s["scaling"] == "range":
        vr = s["value_range"]
        if not isinstance(vr, list) or len(vr) != 2 or not vr[0] < vr[1]:
            raise UserError(f"scaling: range needs value_range: [low, high] with low < high, got {vr!r}")
    p = s["prepare"]
    if not 0 <= p["val_fraction"] < 1:
        raise UserError(f"prepare.val_fraction must be in [0, 1), got {p['val_fraction']!r}")
    if not 0 <= p["empty_fraction"] <= 1:
        raise UserError(f"prepare.empty_fraction must be in [0, 1], got {p['empty_fraction']!r}")
    if p["min_area_px"] < 0 or p["block_tiles"] < 1:
        raise UserError("prepare.min_area_px must be >= 0 and prepare.block_tiles >= 1")
    if p["workers"] is not None and (not isinstance(p["workers"], int) or not 1 <= p["workers"] <= 4096):
        raise UserError(f"prepare.workers must be an integer in [1, 4096], got {p['workers']!r}")
    r = s["run"]
    if r["batch_size"] is None:
        r["batch_size"] = 8 if r["device"] == "cuda" else 2
    if not isinstance(r["batch_size"], int) or not 1 <= r["batch_size"] <= 256:
        raise UserError(f"batch_size must be an integer in [1, 256], got {r['batch_size']!r}")
    if not 0 <= r["score_threshold"] <= 1 or not 0 < r["mask_threshold"] < 1:
        raise UserError("score_threshold must be in [0, 1] and mask_threshold in (0, 1)")
    if r["device"] not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda, got {r['device']!r}")
    if not isinstance(r["workers"], int) or not 1 <= r["workers"] <= 1024:
        raise UserError(f"workers must be an integer in [1, 1024], got {r['workers']!r}")
    if not 0 < r["gpus_per_worker"] <= 8:
        raise UserError(f"gpus_per_worker must be in (0, 8], got {r['gpus_per_worker']!r}")
    if not isinstance(s["min_part_px"], int) or s["min_part_px"] < 0:
        raise UserError(f"min_part_px must be an integer number of pixels >= 0, got {s['min_part_px']!r}")
    if not isinstance(r["min_area"], (int, float)) or r["min_area"] < 0:
        raise UserError(f"min_area must be a number of square metres >= 0, got {r['min_area']!r}")
    if r["batches_in_flight"] < 1 or r["simplify"] < 0:
        raise UserError("batches_in_flight must be >= 1 and simplify >= 0")
    if r["format"] not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {r['format']!r}")
    if r["precision"] not in PRECISIONS:
        raise UserError(f"precision must be auto, float32, float16 or bfloat16, got {r['precision']!r}")
    m = s["merge"]
    if not 0 < m["iou_threshold"] <= 1 or not 0 < m["ios_threshold"] <= 1:
        raise UserError("merge thresholds must be in (0, 1]")
    if not isinstance(m["class_agnostic"], bool):
        raise UserError(f"merge.class_agnostic must be true or false, got {m['class_agnostic']!r}")
    if not isinstance(m["edge_margin"], int) or not 0 <= m["edge_margin"] <= 64:
        raise UserError(f"merge.edge_margin must be an integer number of pixels in [0, 64], got {m['edge_margin']!r}")


def check_types(defaults: dict[str, Any], given: dict[str, Any], section: str = "") -> None:
    """Every setting whose default is a number or a boolean must be one (a YAML typo such as `"0.5"` or `[1]`
    is named by its key, never a TypeError deep in the run). Settings that default to None or text are
    checked by `validate` itself."""
    for key, default in defaults.items():
        value, name = given.get(key), f"{section}{key}"
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise UserError(f"{name} must be a section of settings, got {value!r}")
            check_types(default, value, f"{name}.")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise UserError(f"{name} must be true or false, got {value!r}")
        elif isinstance(default, (int, float)) and value is not None:
            wanted = int if isinstance(default, int) else (int, float)
            if isinstance(value, bool) or not isinstance(value, wanted):
                kind = "an integer" if wanted is int else "a number"
                raise UserError(f"{name} must be {kind}, got {value!r}")


def default_of(key: str) -> Any:
    """The default of a setting named by its path in the config file (`run.score_threshold`)."""
    value: Any = DEFAULTS
    for part in key.split("."):
        value = value[part]
    return value


def settings_overrides(options: dict[str, Any]) -> dict[str, Any]:
    """Flat option names (CLI flags, `run_scene(**options)`) -> the nested overrides they stand for.

    A name is looked up at the top level first, then in the prepare, run and merge sections; None values
    mean "not given" and are skipped.
    """
    nested: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name in DEFAULTS and not isinstance(DEFAULTS[name], dict):
            nested[name] = value
            continue
        section = next((s for s in ("run", "merge", "prepare") if name in DEFAULTS[s]), None)
        if section is None:
            raise UserError(f"unknown option '{name}'")
        nested.setdefault(section, {})[name] = value
    return nested
