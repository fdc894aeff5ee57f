"""Per-tile results saved beside the output while a run is under way, so an interrupted run resumes.

Each finished window is one small file of raw arrays behind a JSON header (no pickle, no zip: a tile costs
one write), written atomically. A manifest holds a fingerprint
of everything that decides a tile's result (scene, model, reading and threshold options); a store whose
fingerprint differs is stale and is cleared rather than reused. Every tile carries the fingerprint too and
is reused only under it: a tile written under other settings is never taken for one of this run's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from core.files import atomic_path
from pipeline.features import Rows
from pipeline.instances import InstanceBlock
from pipeline.worker import TileOutput

FORMAT = 2  # version 1 (until 2026-12) saved raw detections; its tiles are discarded and computed again


def state_dir(output: str | Path, layer: str | None = None) -> Path:
    """`.OUT.gpkg.tiles` beside the output; `.OUT.gpkg.LAYER.tiles` for one of several layers in one file."""
    output = Path(output)
    return output.with_name(f".{output.name}.{layer}.tiles" if layer else f".{output.name}.tiles")


def pack_rows(prefix: str, rows: Rows) -> dict[str, np.ndarray]:
    return {f"{prefix}keys": rows.keys, f"{prefix}wkb": np.frombuffer(b"".join(rows.wkb), dtype=np.uint8),
            f"{prefix}wkb_sizes": np.array([len(w) for w in rows.wkb], dtype=np.int64),
            f"{prefix}class_ids": rows.class_ids, f"{prefix}scores": rows.scores, f"{prefix}areas": rows.areas}


def unpack_rows(prefix: str, data: Any) -> Rows:
    blob, ends = data[f"{prefix}wkb"].tobytes(), np.cumsum(data[f"{prefix}wkb_sizes"])
    wkb = [blob[a:b] for a, b in zip(np.concatenate([[0], ends[:-1]]).tolist(), ends.tolist())]
    return Rows(data[f"{prefix}keys"], wkb, data[f"{prefix}class_ids"], data[f"{prefix}scores"], data[f"{prefix}areas"])


def encode(result: TileOutput, key: str) -> dict[str, np.ndarray]:
    block = result.pending
    return {
        "format": np.int64(FORMAT), "fingerprint": np.frombuffer(key.encode(), dtype=np.uint8), "index": np.int64(result.index),
        "status": np.frombuffer(result.status.encode(), dtype=np.uint8), "dropped": result.dropped, "best_dropped": np.float64(result.best_dropped),
        **pack_rows("final_", result.final), **pack_rows("pending_", result.pending_rows),
        "origins": block.origins, "shapes": block.shapes, "bits": block.bits, "scores": block.scores,
        "labels": block.labels, "positions": block.positions,
    }


def decode(data: Any, scene: int) -> TileOutput:
    block = InstanceBlock(data["origins"], data["shapes"], data["bits"], data["scores"], data["labels"],
                          data["positions"])
    return TileOutput(scene, int(data["index"]), data["status"].tobytes().decode(), final=unpack_rows("final_", data),
                      pending=block, pending_rows=unpack_rows("pending_", data), dropped=data["dropped"],
                      best_dropped=float(data["best_dropped"]))


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays as one buffer: an 8-byte header length, a JSON header (dtype, shape, offset of each), the data."""
    header, offset = {}, 0
    arrays = {name: np.asarray(array, order="C") for name, array in arrays.items()}
    for name, array in arrays.items():
        header[name] = [array.dtype.str, list(array.shape), offset]
        offset += array.nbytes
    text = json.dumps(header).encode()
    return b"".join([len(text).to_bytes(8, "little"), text,
                     *(a.tobytes() for a in arrays.values())])


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    data = memoryview(blob)[8 + size:]
    out = {}
    for name, (dtype, shape, offset) in header.items():
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        out[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(tuple(shape))
    return out


class TileStore:
    """The saved tiles of one output. The directory appears with the first saved tile, so a run that fails
    before any tile is done leaves nothing behind."""

    def __init__(self, directory: Path, key: str):
        self.directory = directory
        self.key = key
        self.stale = False
        self.created = False  # the directory and its manifest are there (made by the first save)
        if directory.exists():
            try:
                saved = json.loads((directory / "manifest.json").read_text()).get("fingerprint")
            except (OSError, ValueError):
                saved = None
            if saved != key:
                self.stale = True
                shutil.rmtree(directory)

    def saved(self, scene: int) -> Iterator[TileOutput]:
        if not self.directory.exists():
            return
        for path in sorted(self.directory.glob("tile-*.bin")):
            try:
                data = unpack(path.read_bytes())
                fits = int(data["format"]) == FORMAT and data["fingerprint"].tobytes().decode() == self.key
                result = decode(data, scene) if fits else None
            except (OSError, ValueError, KeyError, TypeError):
                result = None  # damaged by a crash mid-write, or saved by an older version
            if result is None:  # or made under other settings: that tile simply runs again
                path.unlink(missing_ok=True)
            else:
                yield result

    def save(self, result: TileOutput) -> None:
        if not self.created:  # asked once, not per tile: a file system call costs as much as packing the tile
            self.directory.mkdir(parents=True, exist_ok=True)
            if not (self.directory / "manifest.json").exists():
                with atomic_path(self.directory / "manifest.json") as tmp:
                    tmp.write_text(json.dumps({"fingerprint": self.key}))
            self.created = True
        # Written beside its final name and renamed: a tile file is whole or absent.
        path = self.directory / f"tile-{result.index:08d}.bin"
        partial = path.with_suffix(".partial")
        partial.write_bytes(pack(encode(result, self.key)))
        os.replace(partial, path)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
