"""Command line: `python -m pipeline run | prepare | train | evaluate | compare`.

Bad input is reported as one line on stderr with a non-zero exit; `--debug` shows the traceback.
Exit codes: 0 done, 1 unexpected error, 2 bad input, 3 output written but incomplete, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from model.cluster import release_ray
from model.errors import Interrupted, UserError, first_line

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


def add_reading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="pipeline settings YAML (default: configs/pipeline.yaml defaults)")
    p.add_argument("--tile", type=int, help="window size in pixels")
    p.add_argument("--overlap", type=int, help="pixels shared by neighbouring windows")
    p.add_argument("--bands", type=_bands, help="1-based scene bands for the 3 model channels, e.g. 1,1,1")
    p.add_argument("--nodata", type=_nodata, help="the value of pixels that are not image (e.g. an orthomosaic's "
                                                 "white collar: 255), over the scene's own; or one per band: 0,0,0")
    p.add_argument("--min-part-px", type=int, help="drop parts of a multipart object under this many pixels "
                                                  "(specks; the object's largest part always stays; 0 keeps all)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")


def add_training_options(p: argparse.ArgumentParser) -> None:
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--iters", type=int)
    length.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
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

    p = sub.add_parser("run", parents=[common],
                       help="tiled inference over GeoTIFF scenes -> GeoPackage of instance polygons")
    p.add_argument("scenes", nargs="+", metavar="SCENE",
                   help="GeoTIFF (local, COG, /vsicurl/, /vsis3/), a glob pattern ('tiles/*.tif') or a scene list "
                        "(.txt, one per line)")
    p.add_argument("--checkpoint", help="trained model (.pt) from `python -m pipeline train`")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", help="one GeoPackage; with several scenes, one layer per scene")
    out.add_argument("--out-dir", help="one SCENE.gpkg per scene in this directory (default: beside each scene)")
    add_reading_options(p)
    p.add_argument("--batch-size", type=int, help="tiles per model forward")
    p.add_argument("--score-threshold", type=float, help="drop detections scoring below this")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--ray-address", help="none: Ray in-process; 'auto' or HOST:PORT: an existing cluster")
    p.add_argument("--workers", type=int, help="model actors")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--threads-per-worker", type=int, help="torch threads per actor (default: cores / workers)")
    p.add_argument("--simplify", type=float, help="polygon simplification tolerance in pixels")
    p.add_argument("--min-area", dest="min_area", type=float,
                   help="leave out objects under this many square metres (true area on the ellipsoid)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prepare", parents=[common], help="GeoTIFF scenes + labeled vectors -> COCO tiles for training")
    p.add_argument("scenes", nargs="+", metavar="SCENE",
                   help="GeoTIFF, glob pattern ('tiles/*.tif') or scene list (.txt, one per line)")
    p.add_argument("--labels", required=True, help="GeoPackage / GeoJSON / Shapefile of polygons, any CRS")
    p.add_argument("--out", required=True, help="output directory (gets train/ and val/)")
    add_reading_options(p)
    p.add_argument("--class-field", help="label attribute holding the class name")
    p.add_argument("--class-name", help="one class name for every label")
    p.add_argument("--min-area", dest="min_area_px", type=float, help="drop clipped objects under N pixels")
    p.add_argument("--empty-fraction", type=float, help="fraction of label-free tiles kept")
    p.add_argument("--val-fraction", type=float, help="fraction of spatial blocks for validation")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="parallel Ray tasks (default: this process alone; with "
                                               "--ray-address, every CPU of the cluster)")
    p.add_argument("--ray-address", help="none: this machine; 'auto' or HOST:PORT: an existing Ray cluster "
                                         "(--out and the scenes must be on storage every node sees)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", parents=[common], help="train Mask R-CNN on prepared COCO tiles")
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

    p = sub.add_parser("evaluate", parents=[common], help="COCO bbox and mask AP of a checkpoint on COCO tiles")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="COCO tiles directory, e.g. DIR/val")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--out", help="metrics JSON (default: CHECKPOINT.eval.json)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", parents=[common], help="train + evaluate several backbones identically; one table")
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--data", required=True)
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
    from pipeline.settings import load_settings, settings_overrides

    options = _options(args, ["tile", "overlap", "bands", "nodata", "min_part_px", "min_area", "batch_size",
                              "score_threshold", "device", "ray_address", "workers", "gpus_per_worker",
                              "threads_per_worker", "simplify"])
    if args.overwrite:
        options["overwrite"] = True
    settings = load_settings(args.config, settings_overrides(options))  # refuse bad options before any work
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
    from pipeline.prepare import prepare
    from pipeline.settings import load_settings, settings_overrides

    options = _options(args, ["tile", "overlap", "bands", "nodata", "min_part_px", "class_field", "class_name",
                              "min_area_px", "empty_fraction", "val_fraction", "seed"])
    overrides = settings_overrides(options)
    # --workers and --ray-address share their flat names with `run`'s keys; here they are prepare's.
    overrides.setdefault("prepare", {}).update(_options(args, ["workers", "ray_address"]))
    settings = load_settings(args.config, overrides)
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
    # SIGTERM stops like Ctrl-C: save, report, exit 130. In place before any Ray starts (model.cluster keeps
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
