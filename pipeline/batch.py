"""Many scenes in one job: one GeoPackage per scene, or one GeoPackage with a layer per scene.

The scenes run one after another on the same Ray actors (the model is loaded once per worker). A rerun
after an interruption skips the scenes that are done: their outputs (or layers) carry a fingerprint of
the scene, model and options that produced them.

With one file for all scenes, the layers collect in a hidden work file beside the output
(`.NAME.partial.gpkg`), each added atomically; it becomes the output only when every scene is done, so
the output appears complete or not at all, like a single scene's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from model.errors import UserError
from model.files import check_not_input, check_writable, exclusive, lock_path
from pipeline.execute import RayPool
from pipeline.raster import is_virtual
from pipeline.run import RunSummary, check_output, run_scene
from pipeline.scenes import unique_names


def per_scene_outputs(scenes: list[str], out_dir: Path | None) -> list[Path]:
    """SCENE.gpkg in `out_dir`, or beside each scene (scenes read through /vsi... paths need an out_dir)."""
    outputs = []
    for scene in scenes:
        if out_dir is None and is_virtual(scene):
            raise UserError(f"{scene}: give --out-dir (or -o) for scenes read through GDAL's virtual file systems")
        outputs.append((out_dir or Path(scene).parent) / f"{Path(scene).stem}.gpkg")
    repeated = next((o for o in outputs if outputs.count(o) > 1), None)
    if repeated is not None:
        raise UserError(f"several scenes would write {repeated}; rename them or run them in separate jobs")
    return outputs


def work_file(output: Path) -> Path:
    return output.with_name(f".{output.stem}.partial.gpkg")


def run_scenes(scenes: list[str], predictor: Callable, pool: RayPool, *, output: Path | None = None,
               out_dir: Path | None = None, overwrite: bool = False, **run_options: Any) -> Iterator[RunSummary]:
    """Run every scene; yield each scene's summary as it finishes.

    `output`: one GeoPackage, one layer per scene (named after it). Else `out_dir`: one GeoPackage per
    scene named after it (default: beside each scene). `run_options`: as for `run_scene`.
    """
    if output is not None and len(scenes) > 1:
        yield from run_into_one_file(scenes, output, predictor, pool, overwrite, **run_options)
        return
    outputs = [output] if output is not None else per_scene_outputs(scenes, out_dir)
    inputs = [*scenes, getattr(predictor, "checkpoint", None), run_options.get("config")]
    for path in outputs:  # scene b.gpkg (a raster GeoPackage) may be the output of scene b.tif
        check_not_input(path, inputs)
    for scene, path in zip(scenes, outputs):
        yield run_scene(scene, path, predictor, pool=pool, overwrite=overwrite, **run_options)


def run_into_one_file(scenes: list[str], output: Path, predictor: Callable, pool: RayPool, overwrite: bool,
                      **run_options: Any) -> Iterator[RunSummary]:
    names = unique_names(scenes)
    check_output(output)
    check_writable(output, overwrite)  # refuse before any scene runs, not after the first one
    work = work_file(output)
    inputs = [*scenes, getattr(predictor, "checkpoint", None), run_options.get("config")]
    for path in (output, work, lock_path(output)):
        check_not_input(path, inputs)
    with exclusive(output):  # one job per output file; each scene also holds the work file while it runs
        for scene, name in zip(scenes, names):
            summary = run_scene(scene, work, predictor, pool=pool, layer=name, keep_other_layers=True,
                                sidecar_base=output.with_name(f"{output.stem}.{name}.gpkg"), **run_options)
            summary.output = str(output)
            yield summary
        os.replace(work, output)
