"""Per-tile results saved beside the output while a run is under way, so an interrupted run resumes.

Each finished window is one small `.npz` (no pickle), written atomically. A manifest holds a fingerprint
of everything that decides a tile's result (scene, model, reading and threshold options); a store whose
fingerprint differs is stale and is cleared rather than reused. Every tile carries the fingerprint too and
is reused only under it: a tile written under other settings is never taken for one of this run's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from model.files import atomic_path
from pipeline.execute import TileResult
from pipeline.instances import Instance


def state_dir(output: str | Path, layer: str | None = None) -> Path:
    """`.OUT.gpkg.tiles` beside the output; `.OUT.gpkg.LAYER.tiles` for one of several layers in one file."""
    output = Path(output)
    return output.with_name(f".{output.name}.{layer}.tiles" if layer else f".{output.name}.tiles")


def encode(result: TileResult, key: str) -> dict[str, np.ndarray]:
    inst = result.instances
    shapes = np.array([m.mask.shape for m in inst], dtype=np.int64).reshape(-1, 2)
    bits = np.concatenate([m.mask.ravel() for m in inst]) if inst else np.zeros(0, dtype=bool)
    return {
        "fingerprint": np.array(key),
        "index": np.int64(result.index),
        "status": np.array(result.status),
        "origin": np.array([(m.row, m.col) for m in inst], dtype=np.int64).reshape(-1, 2),
        "shapes": shapes,
        "scores": np.array([m.score for m in inst], dtype=np.float64),
        "labels": np.array([m.label for m in inst], dtype=np.int64),
        "windows": np.array([m.window for m in inst], dtype=np.int64).reshape(-1, 4),
        "bits": np.packbits(bits),
    }


def decode(data: Any) -> TileResult:
    shapes = data["shapes"]
    sizes = shapes[:, 0] * shapes[:, 1]
    bits = np.unpackbits(data["bits"], count=int(sizes.sum())).astype(bool)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    instances = [
        Instance(row=int(r), col=int(c), mask=bits[starts[i]:starts[i + 1]].reshape(shapes[i]),
                 score=float(data["scores"][i]), label=int(data["labels"][i]),
                 window=tuple(int(v) for v in data["windows"][i]))
        for i, (r, c) in enumerate(data["origin"])
    ]
    return TileResult(int(data["index"]), str(data["status"]), instances)


class TileStore:
    """The saved tiles of one output. The directory appears with the first saved tile, so a run that fails
    before any tile is done leaves nothing behind."""

    def __init__(self, directory: Path, key: str):
        self.directory = directory
        self.key = key
        self.stale = False
        if directory.exists():
            try:
                saved = json.loads((directory / "manifest.json").read_text()).get("fingerprint")
            except (OSError, ValueError):
                saved = None
            if saved != key:
                self.stale = True
                shutil.rmtree(directory)

    def saved(self) -> Iterator[TileResult]:
        if not self.directory.exists():
            return
        for path in sorted(self.directory.glob("tile-*.npz")):
            try:
                with np.load(path, allow_pickle=False) as data:
                    result = decode(data) if str(data["fingerprint"]) == self.key else None
            except (OSError, ValueError, KeyError):
                result = None  # damaged by a crash mid-write, or saved by an older version
            if result is None:  # or made under other settings: that tile simply runs again
                path.unlink(missing_ok=True)
            else:
                yield result

    def save(self, result: TileResult) -> None:
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            with atomic_path(self.directory / "manifest.json") as tmp:
                tmp.write_text(json.dumps({"fingerprint": self.key}))
        with atomic_path(self.directory / f"tile-{result.index:08d}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **encode(result, self.key))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
