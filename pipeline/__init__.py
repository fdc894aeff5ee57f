"""Geography for aerial instance segmentation: windows, rasters, labels, Ray inference, seam merge, GeoPackage.

`pipeline.run_scene` is the public entry point of the main job (see pipeline/run.py); it is imported
lazily so that `python -m pipeline --help` stays fast.
"""

from typing import Any

__all__ = ["run_scene"]


def __getattr__(name: str) -> Any:
    if name == "run_scene":
        from pipeline.run import run_scene

        return run_scene
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
