"""Command line: `python -m pipeline run | prepare | train | evaluate | compare`.

Bad input is reported as one line on stderr with a non-zero exit; `--debug` shows the traceback.
Exit codes: 0 done, 1 unexpected error, 2 bad input, 3 output written but incomplete, 130 interrupted.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from core.cluster import release_ray
from core.errors import Interrupted, UserError, first_line
from pipeline.settings import PRECISIONS, SCALINGS
from pipeline.writers import FORMATS

EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_INTERRUPTED = 2, 3, 130


def _bands(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bands must look like 3,2,1, got {text!r}") from None


def _nodata(text: str) -> float | list[float]:
    """--nodata as gdal_translate -a_nodata takes it: one value for every band, or one per band (255 or 0,0,0)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"nodata must be a number, or one per band like 0,0,0, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _pair(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like 2,98, got {text!r}")
    return values


class ShowDefaults(argparse.HelpFormatter):
    """`--help` shows each flag's default: argparse's own where the flag has one; setting flags say theirs."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default:" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def setting(p: argparse.ArgumentParser, flag: str, key: str, help: str, none: str = "none", **kwargs: Any) -> None:
    """A flag for the pipeline setting `key` (`run.score_threshold`): given, it overrides the config file.
    Its help names the setting and its default (`none` says what a None default means)."""
    from pipeline.settings import default_of

    default = default_of(key)
    dest = kwargs.pop("dest", key.rpartition(".")[2])
    p.add_argument(flag, dest=dest, default=None,
                   help=f"{help} (default: {none if default is None else shown(default)}; setting {key})", **kwargs)
    p.set_defaults(setting_flags=[*(p.get_default("setting_flags") or []), (key, dest)])


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave as flags, nested as in the config file."""
    nested: dict[str, Any] = {}
    for key, dest in args.setting_flags:
        value = getattr(args, dest)
        if value is not None:
            *sections, name = key.split(".")
            target = nested
            for section in sections:
                target = target.setdefault(section, {})
            target[name] = value
    return nested


def add_reading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="pipeline settings YAML (default: configs/pipeline.yaml defaults)")
    setting(p, "--tile", "tile", "window size in pixels", type=int)
    setting(p, "--overlap", "overlap", "pixels shared by neighbouring windows", type=int)
    setting(p, "--bands", "bands", "1-based scene bands for the 3 model channels, e.g. 1,1,1", type=_bands,
            none="1,2,3, or 1,1,1 for one band")
    setting(p, "--nodata", "nodata", "the value of pixels that are not image (e.g. an orthomosaic's white collar: "
            "255), over the scene's own; or one per band: 0,0,0", type=_nodata, none="the scene's own")
    setting(p, "--scaling", "scaling", "scene values -> model input: auto (uint8 / 255, other types a per-scene "
            "percentile stretch), divide255, percentile or range", choices=SCALINGS)
    setting(p, "--percentiles", "percentiles", "low,high percentiles of the percentile stretch", type=_pair)
    setting(p, "--value-range", "value_range", "low,high scene values mapped to 0 and 1 with --scaling range "
            "(the same scaling for every scene)", type=_pair)
    setting(p, "--min-part-px", "min_part_px", "drop parts of a multipart object under this many pixels (specks; "
            "the object's largest part always stays; 0 keeps all)", type=int)


def add_training_options(p: argparse.ArgumentParser) -> None:
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--iters", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=int, help="passes over the training tiles")
    p.add_argument("--batch-size", type=int, help="images per step (default: the config's train.batch_size)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model trains")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights' init, the shuffling and augmentations")
    p.add_argument("--validate-every", type=int, metavar="N",
                   help="COCO AP on DATA/val every N iterations (default: after each epoch)")


DEBUG_HELP = "show tracebacks and Ray's own messages"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Instance segmentation of large aerial scenes with Swin-Transformer Mask R-CNN.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # --debug also after the command (`run x.tif --debug`); SUPPRESS keeps a --debug given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", parents=[common], formatter_class=ShowDefaults,
                       help="tiled inference over GeoTIFF scenes -> instance polygons (GeoPackage, GeoParquet, ...)")
    p.add_argument("scenes", nargs="+", metavar="SCENE",
                   help="GeoTIFF (local, COG, /vsicurl/, /vsis3/), a glob pattern ('tiles/*.tif') or a scene list "
                        "(.txt, one per line)")
    setting(p, "--checkpoint", "run.checkpoint", "trained model (.pt) from `python -m pipeline train`")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", help="the output file, its format by its suffix: .gpkg (with several "
                                            "scenes, one layer per scene), .parquet, .fgb, .shp, .geojson")
    out.add_argument("--out-dir", help="one SCENE.gpkg (see --format) per scene in this directory (default: beside "
                                       "each scene)")
    setting(p, "--format", "run.format", "format of the files named after their scenes (--out-dir or beside "
            "each scene); -o chooses by its suffix", choices=FORMATS)
    add_reading_options(p)
    setting(p, "--overwrite", "run.overwrite", "replace an existing output", action="store_true")
    setting(p, "--batch-size", "run.batch_size", "tiles per model forward", type=int, none="2 on the CPU, 8 on a GPU")
    setting(p, "--score-threshold", "run.score_threshold", "drop detections scoring below this", type=float)
    setting(p, "--mask-threshold", "run.mask_threshold", "mask probability at which a pixel is the object's",
            type=float)
    setting(p, "--device", "run.device", "where the model runs", choices=["cpu", "cuda"])
    setting(p, "--precision", "run.precision", "cuda only: auto (the checkpoint's model.amp), float32, float16 or "
            "bfloat16 autocast", choices=PRECISIONS)
    setting(p, "--ray-address", "run.ray_address", "'auto' or HOST:PORT: an existing Ray cluster",
            none="$RAY_ADDRESS if set, else Ray in-process")
    setting(p, "--workers", "run.workers", "model actors", type=int)
    setting(p, "--gpus-per-worker", "run.gpus_per_worker", "GPUs per actor with --device cuda", type=float)
    setting(p, "--threads-per-worker", "run.threads_per_worker", "torch threads per actor", type=int,
            none="cores / workers")
    setting(p, "--batches-in-flight", "run.batches_in_flight", "batches queued per actor (bounds memory)", type=int)
    setting(p, "--simplify", "run.simplify", "polygon simplification tolerance in pixels", type=float)
    setting(p, "--min-area", "run.min_area", "leave out objects under this many square metres (true area on the "
            "ellipsoid)", type=float)
    setting(p, "--layer", "run.layer", "GeoPackage layer name (one scene)", none="named after the scene")
    setting(p, "--quicklook", "run.quicklook", "write OUTPUT.quicklook.png, the overview with the polygons",
            action=argparse.BooleanOptionalAction)
    setting(p, "--iou-threshold", "merge.iou_threshold", "seam merge: mask IoU inside the ground both windows saw",
            type=float)
    setting(p, "--ios-threshold", "merge.ios_threshold", "seam merge: or intersection over the smaller mask there",
            type=float)
    setting(p, "--class-agnostic", "merge.class_agnostic", "seam merge: views of different classes can be one "
            "object", action=argparse.BooleanOptionalAction)
    setting(p, "--edge-margin", "merge.edge_margin", "seam merge: a view this close (pixels) to an inner window edge "
            "may be cut there", type=int)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prepare", parents=[common], formatter_class=ShowDefaults, help="GeoTIFF scenes + labeled vectors -> COCO tiles for training")
    p.add_argument("scenes", nargs="+", metavar="SCENE",
                   help="GeoTIFF, glob pattern ('tiles/*.tif') or scene list (.txt, one per line)")
    p.add_argument("--labels", required=True, help="GeoPackage / GeoJSON / Shapefile of polygons, any CRS")
    p.add_argument("--out", required=True, help="output directory (gets train/ and val/)")
    add_reading_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    setting(p, "--class-field", "prepare.class_field", "label attribute holding the class name")
    setting(p, "--class-name", "prepare.class_name", "one class name for every label")
    setting(p, "--min-area", "prepare.min_area_px", "drop clipped objects under N pixels", type=float)
    setting(p, "--empty-fraction", "prepare.empty_fraction", "fraction of label-free tiles kept", type=float)
    setting(p, "--val-fraction", "prepare.val_fraction", "fraction of spatial blocks for validation", type=float)
    setting(p, "--block-tiles", "prepare.block_tiles", "edge of a spatial split block, in tiles", type=int)
    setting(p, "--seed", "prepare.seed", "seed of the label-free tiles' draw and the split", type=int)
    setting(p, "--workers", "prepare.workers", "parallel Ray tasks", type=int,
            none="this process alone; with --ray-address, every CPU of the cluster")
    setting(p, "--ray-address", "prepare.ray_address", "'auto' or HOST:PORT: an existing Ray cluster (--out and the "
            "scenes must be on storage every node sees)", none="this machine")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", parents=[common], formatter_class=ShowDefaults, help="train Mask R-CNN on prepared COCO tiles")
    p.add_argument("--config", required=True, help="model config, e.g. configs/swin_t.yaml")
    p.add_argument("--data", required=True, help="a `prepare` output directory")
    p.add_argument("--out", required=True, help="checkpoint path (model.pt); losses go beside it")
    add_training_options(p)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint at --out")
    p.add_argument("--validate", action="store_true", help="COCO AP on DATA/val after each epoch")
    p.add_argument("--workers", type=int, help="data-parallel training on N Ray Train workers, each with "
                   "--batch-size images (default: this process alone)")
    p.add_argument("--gpus-per-worker", type=float, help="with --workers and --device cuda (default 1)")
    p.add_argument("--threads-per-worker", type=int, help="torch threads per worker (default: CPUs / workers)")
    p.add_argument("--ray-address", help="with --workers; none: Ray in-process; 'auto' or HOST:PORT: a cluster")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[common], formatter_class=ShowDefaults, help="COCO bbox and mask AP of a checkpoint on COCO tiles")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="COCO tiles directory, e.g. DIR/val")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    p.add_argument("--batch-size", type=int, default=2, help="tiles per forward")
    p.add_argument("--out", help="metrics JSON (default: CHECKPOINT.eval.json)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", parents=[common], formatter_class=ShowDefaults, help="train + evaluate several backbones identically; one table")
    p.add_argument("--configs", nargs="+", required=True, help="model configs, one per backbone to compare")
    p.add_argument("--data", required=True, help="a `prepare` output directory (train/ and val/)")
    add_training_options(p)
    p.add_argument("--out-dir", default="compare",
                   help="checkpoints, the table (compare.md, compare.json) and the curves (compare.png)")
    p.set_defaults(func=cmd_compare)
    return parser


def _options(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.batch import plan_tasks, run_planned
    from pipeline.pool import RayPool
    from pipeline.run import checkpoint_predictor
    from pipeline.scenes import expand_scenes
    from pipeline.settings import load_settings

    if args.format and args.output:
        raise UserError(f"--format names the files of --out-dir; -o {args.output} has its format by its suffix")
    settings = load_settings(args.config, overrides_from(args))  # refuse bad options before any work
    scenes = expand_scenes(args.scenes)
    predictor = checkpoint_predictor(args.checkpoint, settings)
    output = Path(args.output) if args.output else None
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{out_dir}: cannot create the output directory ({exc.strerror})") from None
    # Every scene's output is checked before Ray starts and the model loads: bad input answers at once.
    tasks = plan_tasks(scenes, settings, output=output, out_dir=out_dir, inputs=[predictor.checkpoint, args.config])
    code = 0
    with RayPool(predictor, settings) as pool:
        for summary in run_planned(tasks, predictor, settings, pool, True, output if len(scenes) > 1 else None):
            print("\n".join(summary.lines()))
            if not summary.complete:
                code = EXIT_INCOMPLETE
    return code


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.training_data.prepare import prepare
    from pipeline.settings import load_settings

    settings = load_settings(args.config, overrides_from(args))
    prepare(args.scenes, args.labels, args.out, settings, overwrite=bool(args.overwrite), config=args.config)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from model.config import load_config
    from model.train import TrainOptions, train

    config = load_config(args.config)
    options = TrainOptions(data=Path(args.data), out=Path(args.out), iters=args.iters, epochs=args.epochs,
                           batch_size=args.batch_size, device=args.device, seed=args.seed, resume=args.resume,
                           validate=args.validate or args.validate_every is not None,
                           validate_every=args.validate_every)
    cluster = _options(args, ["gpus_per_worker", "threads_per_worker", "ray_address"])
    if args.workers is None:
        if cluster:
            raise UserError(f"--{'/--'.join(k.replace('_', '-') for k in cluster)} needs --workers N")
        summary = train(config, options)
    else:
        from model.distributed import WorkerOptions, train_distributed

        summary = train_distributed(config, options, WorkerOptions(args.workers, **cluster))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("val", "history")}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from model.evaluate import evaluate_checkpoint

    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".eval.json")
    evaluate_checkpoint(args.checkpoint, Path(args.data), args.device, args.batch_size, out)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from model.compare import compare

    compare(args.configs, Path(args.data), Path(args.out_dir), iters=args.iters, epochs=args.epochs,
            batch_size=args.batch_size, device=args.device, seed=args.seed, validate_every=args.validate_every)
    return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _not_a_ray_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or not (record.name == "ray" or record.name.startswith("ray."))


def _show_ray_warnings(show: bool) -> None:
    """Ray's warnings (its token notice at start-up and the like) are not this tool's messages: only with
    --debug; its errors always show. Ray is started with configure_logging=False, which leaves its loggers
    without handlers, so what they print goes through Python's last-resort handler (and `import ray` resets
    the "ray" logger's level, so the filter goes on that handler)."""
    if logging.lastResort is not None:
        if show:
            logging.lastResort.removeFilter(_not_a_ray_warning)
        else:
            logging.lastResort.addFilter(_not_a_ray_warning)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM stops like Ctrl-C: save, report, exit 130. In place before any Ray starts (core.cluster keeps
    # it through ray.init, and holds it while Ray's processes start so that stopping them stops them all).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    _show_ray_warnings(args.debug)
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        message = str(exc) if isinstance(exc, Interrupted) else "interrupted"
        print(message, file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        release_ray()  # whatever path ends the command: no Ray processes of this run stay behind


def entry() -> None:
    """The program (`python -m pipeline`, `aerial-seg`): `main`, then exit without the interpreter's final
    garbage collection, which walks every object torch, Ray and GDAL made (1.2 of the 1.6 s an exit takes on
    a 2-core machine, more under load, and after Ctrl-C too). Nothing depends on it: every output is closed
    and renamed before `main` returns."""
    code = main()
    gc.freeze()
    sys.exit(code)
