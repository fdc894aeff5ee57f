"""Which scenes a command works on, and what each is called in the outputs.

A scene argument is a raster path (local or a GDAL virtual path such as /vsis3/...), a glob pattern
(`tiles/*.tif`, `**` recurses) or a manifest: a text file (.txt, .lst, .list) with one scene per line,
blank lines and `#` comments ignored, relative paths taken from the manifest's folder. Batch jobs name
their inputs in manifests; shells without globbing (Ray job entrypoints, Windows) can still pass patterns.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from core.errors import UserError
from pipeline.raster import is_virtual

MANIFEST_SUFFIXES = (".txt", ".lst", ".list")
GLOB_CHARS = re.compile(r"[*?\[]")


def read_manifest(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the scene list ({exc})") from None
    scenes = []
    for line in lines:
        entry = line.split("#", 1)[0].strip()
        if entry:
            scenes.append(entry if is_virtual(entry) or Path(entry).is_absolute() else str(path.parent / entry))
    if not scenes:
        raise UserError(f"{path}: the scene list is empty")
    return scenes


def expand_scenes(arguments: list[str]) -> list[str]:
    """Scene arguments (paths, globs, manifests) -> scene paths in the order given, each once.

    An existing file is always itself, even when its name holds glob characters (`ortho[2023].tif` would
    otherwise match `ortho2.tif`)."""
    scenes: list[str] = []
    for argument in arguments:
        literal = os.path.exists(argument)
        if not literal and not is_virtual(argument) and GLOB_CHARS.search(argument):
            found = sorted(glob.glob(argument, recursive=True))
            if not found:
                raise UserError(f"{argument}: no file matches this pattern")
            scenes += found
        elif Path(argument).suffix.lower() in MANIFEST_SUFFIXES and Path(argument).is_file():
            scenes += read_manifest(Path(argument))
        else:
            scenes.append(argument)
    unique = list(dict.fromkeys(scenes))
    if not unique:
        raise UserError("no scene given")
    return unique


def scene_name(scene: str) -> str:
    """The scene's file name without extension, as a safe layer / file name: letters, digits and `_`.

    GeoPackage table names with spaces, dots or dashes need quoting in every SQL a user writes; names that
    start with `gpkg_` or `rtree_` are reserved by the format.
    """
    stem = Path(scene.rstrip("/")).stem
    name = re.sub(r"[^0-9A-Za-z_]+", "_", stem).strip("_") or "scene"
    if name.lower().startswith(("gpkg_", "rtree_", "sqlite_")):
        name = f"scene_{name}"
    return name


def unique_names(scenes: list[str]) -> list[str]:
    """One name per scene; two scenes with the same name would overwrite each other's output, so refuse."""
    names = [scene_name(s) for s in scenes]
    seen: dict[str, str] = {}
    for scene, name in zip(scenes, names):
        if name in seen:
            raise UserError(f"{seen[name]} and {scene} would both be written as '{name}'; rename one or run "
                            "them in separate jobs")
        seen[name] = scene
    return names


def scene_identity(scene: str) -> dict[str, Any]:
    """What tells a scene apart from an edited or replaced one, for resume fingerprints."""
    try:
        stat = os.stat(scene)
        return {"path": os.path.abspath(scene), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    except OSError:  # a GDAL virtual path (/vsicurl/, /vsis3/): its name is all we have
        return {"path": str(scene)}


def fingerprint(parts: dict[str, Any]) -> str:
    """A stable hash of everything that decides a saved result; a different hash means the result is stale."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
