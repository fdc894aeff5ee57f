"""Many scenes in one job: one output file per scene (any format), or one GeoPackage with a layer per scene.

The scenes share the same model workers (the model is loaded once per worker) and flow into each other (the
next scene's tiles are computed while the previous one is written). A rerun after an interruption skips the
scenes that are done: their outputs (or layers; or the run reports beside outputs of formats that keep no
metadata) carry a fingerprint of the scene, model and options that produced them.

With one file for all scenes, the layers collect in a hidden work file beside the output
(`.NAME.partial.gpkg`), each added atomically; it becomes the output only when every scene is done, so
the output appears complete or not at all, like a single scene's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.files import check_not_input, check_writable, exclusive, lock_path
from pipeline.pool import RayPool
from pipeline.raster import is_virtual
from pipeline.run import run_job
from pipeline.scene_run import SceneTask, check_output
from pipeline.scenes import scene_name, unique_names
from pipeline.settings import Settings, load_settings, settings_overrides
from pipeline.summary import RunSummary
from pipeline.writers import writer_for


def per_scene_outputs(scenes: list[str], out_dir: Path | None, suffix: str = ".gpkg") -> list[Path]:
    """SCENE.gpkg (or another `suffix`) in `out_dir`, or beside each scene (scenes read through /vsi... paths
    need an out_dir)."""
    outputs = []
    for scene in scenes:
        if out_dir is None and is_virtual(scene):
            raise UserError(f"{scene}: give --out-dir (or -o) for scenes read through GDAL's virtual file systems")
        outputs.append((out_dir or Path(scene).parent) / f"{Path(scene).stem}{suffix}")
    repeated = next((o for o in outputs if outputs.count(o) > 1), None)
    if repeated is not None:
        raise UserError(f"several scenes would write {repeated}; rename them or run them in separate jobs")
    return outputs


def work_file(output: Path) -> Path:
    return output.with_name(f".{output.stem}.partial{output.suffix}")


def plan_tasks(scenes: list[str], settings: Settings, *, output: Path | None = None,
               out_dir: Path | None = None, inputs: list[Any] = ()) -> list[SceneTask]:
    """Every scene's task, with every output checked against every input, before any work starts.

    `output`: one file, one layer per scene (named after it), in a format with layers. Else `out_dir`: one
    file per scene named after it (default: beside each scene), in the format `run.format` names."""
    inputs = [*scenes, *inputs]
    if output is not None and len(scenes) > 1:
        names = unique_names(scenes)
        check_output(output)
        writer = writer_for(output)
        if not writer.layers:
            raise UserError(f"{output}: a {writer.title} file holds one scene; for {len(scenes)} scenes write one "
                            f"file per scene with --out-dir DIR --format {output.suffix[1:].lower()} (or -o "
                            f"{output.stem}.gpkg: one layer per scene)")
        check_writable(output, settings.run.overwrite)  # refuse now, not after the first scene
        work = work_file(output)
        for path in (output, work, lock_path(output)):
            check_not_input(path, inputs)
        tasks = [SceneTask(scene, work, name, output.with_name(f"{output.stem}.{name}{output.suffix}"),
                           keep_other_layers=True) for scene, name in zip(scenes, names)]
    else:
        suffix = f".{settings.run.format}"
        outputs = [output] if output is not None else per_scene_outputs(scenes, out_dir, suffix)
        layer = settings.run.layer
        tasks = [SceneTask(scene, path, layer or scene_name(scene), path) for scene, path in zip(scenes, outputs)]
    for task in tasks:  # scene b.gpkg (a raster GeoPackage) may be the output of scene b.tif
        task.check(inputs)
    return tasks


def run_scenes(scenes: list[str], predictor: Callable, pool: RayPool | None, *, output: Path | None = None,
               out_dir: Path | None = None, config: str | Path | None = None, progress: bool = True,
               **options: Any) -> Iterator[RunSummary]:
    """Run every scene; yield each scene's summary as it is written (see `plan_tasks` for the outputs).
    `options`: as for `run_scene`."""
    settings = load_settings(config, settings_overrides(options))
    tasks = plan_tasks(scenes, settings, output=output, out_dir=out_dir,
                       inputs=[getattr(predictor, "checkpoint", None), config])
    yield from run_planned(tasks, predictor, settings, pool, progress, output if len(scenes) > 1 else None)


def run_planned(tasks: list[SceneTask], predictor: Callable, settings: Settings, pool: RayPool | None,
                progress: bool, one_file: Path | None) -> Iterator[RunSummary]:
    """Run checked tasks; with `one_file`, hold it for the whole job and move the work file into place."""
    with exclusive(one_file) if one_file else contextlib.nullcontext():
        for summary in run_job(tasks, predictor, settings, pool, progress):
            if one_file:
                summary.output = str(one_file)
            yield summary
        if one_file:
            os.replace(work_file(one_file), one_file)
