"""Labeled vectors (GeoPackage, GeoJSON, Shapefile; any CRS) -> repaired polygons with a class name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas as gpd
import shapely
from pyproj import CRS

from core.errors import UserError, first_line

POLYGONAL = ("Polygon", "MultiPolygon")


def polygonal_part(geom: Any) -> Any:
    """The polygons of a geometry (make_valid may return a collection with stray lines or points)."""
    if geom is None or geom.is_empty:
        return None
    if geom.geom_type in POLYGONAL:
        return geom
    if geom.geom_type == "GeometryCollection":
        parts = [g for g in geom.geoms if g.geom_type in POLYGONAL]
        return shapely.union_all(parts) if parts else None
    return None


def read_labels(path: str | Path, class_field: str | None, class_name: str | None) -> tuple[gpd.GeoDataFrame, dict]:
    """(frame with `geometry` and `class_name` in the file's CRS, stats); one-line UserErrors on bad input."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: labels file not found")
    try:
        frame = gpd.read_file(path, engine="pyogrio")
    except Exception as exc:  # pyogrio raises DataSourceError and friends; all mean "cannot read"
        raise UserError(f"{path}: cannot read labels ({first_line(exc)})") from None
    if len(frame) == 0:
        raise UserError(f"{path}: the labels file has no features")
    if frame.crs is None:
        raise UserError(f"{path}: the labels have no CRS (set one, e.g. ogr2ogr -a_srs EPSG:XXXX)")
    fields = [c for c in frame.columns if c != frame.geometry.name]
    if class_field is not None:
        if class_field not in frame.columns:
            raise UserError(f"{path}: no field '{class_field}' (fields: {', '.join(fields) or 'none'})")
        names = frame[class_field]
        missing = names.isna()
        names = names.astype(str)
    elif class_name is not None:
        names = gpd.pd.Series([class_name] * len(frame), index=frame.index)
        missing = names.isna()
    else:
        raise UserError(f"{path}: say which class each label is: --class-field FIELD "
                        f"(fields: {', '.join(fields) or 'none'}) or --class-name NAME")

    stats = {"features": int(len(frame)), "repaired": 0, "dropped_empty": 0, "dropped_not_polygon": 0,
             "dropped_no_class": int(missing.sum())}
    geoms = []
    for geom in frame.geometry:
        if geom is None or geom.is_empty:
            stats["dropped_empty"] += 1
            geoms.append(None)
            continue
        if not geom.is_valid:
            geom = shapely.make_valid(geom)
            stats["repaired"] += 1
        part = polygonal_part(geom)
        if part is None or part.is_empty:
            stats["dropped_not_polygon"] += 1
        geoms.append(part)
    out = gpd.GeoDataFrame({"class_name": names.values}, geometry=geoms, crs=frame.crs)
    out = out[out.geometry.notna() & ~missing.values].reset_index(drop=True)
    if len(out) == 0:
        raise UserError(f"{path}: no usable polygon labels ({stats})")
    return out, stats


def to_scene_crs(labels: gpd.GeoDataFrame, scene_crs: str) -> gpd.GeoDataFrame:
    """Reproject to the scene's CRS (a no-op when they already agree)."""
    target = CRS.from_user_input(scene_crs)
    if labels.crs is not None and CRS.from_user_input(labels.crs).equals(target):
        return labels.set_crs(target, allow_override=True)
    return labels.to_crs(target)
