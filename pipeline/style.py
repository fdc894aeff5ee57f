"""The default QGIS style of an output, so a layer looks right the moment it is opened.

QGIS keeps styles of GeoPackage layers in a `layer_styles` table (its own convention, which GDAL and
QGIS 3.x read); a row with `useAsDefault` is applied when the layer is added. For a file of any other
format QGIS loads `NAME.qml` beside it (the same QML, in a file of its own). The style outlines each
class in its own colour over a faint fill, so the imagery under the polygons stays visible. The colours
are the quicklook's, so the PNG and the GIS view agree.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from core.files import atomic_path

# Class 1, 2, ... outline colours (RGB), chosen to stand out on imagery; they repeat after the last one.
PALETTE = np.array([(255, 40, 40), (40, 220, 255), (255, 220, 0), (255, 0, 200), (60, 255, 60),
                    (255, 140, 0), (150, 100, 255), (255, 255, 255)], dtype=np.uint8)

CLASS_FIELD = "class_name"
STYLE_NAME = "aerial-seg outlines"


def label_name(names: Sequence[str] | None, label: int) -> str:
    """The name of class id `label` (1-based in `names`), or class_N when the model gave none."""
    if names and 1 <= label <= len(names):
        return names[label - 1]
    return f"class_{label}"


def class_colour(class_id: int) -> tuple[int, int, int]:
    r, g, b = PALETTE[(int(class_id) - 1) % len(PALETTE)]
    return int(r), int(g), int(b)


def fill_symbol(name: str, rgb: tuple[int, int, int]) -> str:
    """A QGIS fill symbol: 0.6 mm outline in the class colour, the same colour at 15 % as fill.

    Written with `<prop k v>` elements, which every QGIS 3 release reads (3.22 included)."""
    r, g, b = rgb
    props = {
        "color": f"{r},{g},{b},38", "style": "solid", "outline_color": f"{r},{g},{b},255",
        "outline_style": "solid", "outline_width": "0.6", "outline_width_unit": "MM", "joinstyle": "miter",
    }
    body = "".join(f'<prop k="{k}" v="{v}"/>' for k, v in props.items())
    return (f'<symbol type="fill" name={quoteattr(name)} alpha="1" clip_to_extent="1" force_rhr="0">'
            f'<layer class="SimpleFill" enabled="1" locked="0" pass="0">{body}</layer></symbol>')


def outline_qml(classes: Mapping[int, str]) -> str:
    """QML of a categorized renderer on `class_name`: one category per class id -> name."""
    ordered = sorted(classes.items())
    categories = "".join(
        f'<category render="true" symbol="{i}" value={quoteattr(name)} label={quoteattr(name)}/>'
        for i, (_, name) in enumerate(ordered)
    )
    symbols = "".join(fill_symbol(str(i), class_colour(cid)) for i, (cid, _) in enumerate(ordered))
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.22.0" styleCategories="Symbology">'
        f'<renderer-v2 type="categorizedSymbol" attr="{CLASS_FIELD}" symbollevels="0" enableorderby="0" '
        f'forceraster="0"><categories>{categories}</categories><symbols>{symbols}</symbols>'
        f'<source-symbol>{fill_symbol("0", class_colour(1))}</source-symbol></renderer-v2>'
        "<layerGeometryType>2</layerGeometryType></qgis>\n"
    )


def write_style_file(path: Path, classes: Mapping[int, str]) -> None:
    """The outline style as a QML file (QGIS applies `NAME.qml` to the layer of `NAME.shp`, `NAME.fgb`, ...)."""
    with atomic_path(path) as tmp:
        tmp.write_text(outline_qml(classes))


def write_default_style(gpkg: Path, layer: str, classes: Mapping[int, str]) -> None:
    """Store the outline style as `layer`'s default in the GeoPackage (replacing an older one of ours).

    The table is registered in gpkg_contents as attributes, as the GeoPackage standard asks of every
    user table, so validators and GDAL see a clean file.
    """
    geometry_column = "geom"
    with sqlite3.connect(gpkg) as db:
        row = db.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (layer,)).fetchone()
        if row:
            geometry_column = row[0]
        db.execute(
            "CREATE TABLE IF NOT EXISTS layer_styles (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "f_table_catalog TEXT(256), f_table_schema TEXT(256), f_table_name TEXT(256), "
            "f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT, styleSLD TEXT, "
            "useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30), "
            "update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"
        )
        db.execute(
            "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, last_change) "
            "VALUES ('layer_styles', 'attributes', 'layer_styles', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"
        )
        db.execute("DELETE FROM layer_styles WHERE f_table_name = ? AND styleName = ?", (layer, STYLE_NAME))
        db.execute(
            "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
            "styleName, styleQML, styleSLD, useAsDefault, description, owner, ui) "
            "VALUES ('', '', ?, ?, ?, ?, '', 1, 'Outlines per class, written by aerial-seg', '', '')",
            (layer, geometry_column, STYLE_NAME, outline_qml(classes)),
        )
    db.close()
