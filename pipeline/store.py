"""Per-tile results saved beside the output while a run is under way, so an interrupted run resumes.

The finished windows are appended to one log (`tiles.log`): each record is its length and the tile's raw
arrays behind a JSON header (no pickle, no zip), written with one system call. At GPU rates a file per tile
cost more in creating, renaming and closing it than its bytes. A record cut short by a crash is told by its
length and dropped (the log is cut back to the last whole record before anything is appended); one that
does not read (damaged) is skipped, so its tile simply runs again. A manifest holds a fingerprint of
everything that decides a tile's result (scene, model, reading and threshold options) and the store's
format; a store with another is stale and is cleared rather than reused. Every record carries the
fingerprint too and is reused only under it: a tile written under other settings is never taken for one
of this run's.
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

FORMAT = 3  # 3: one log per store; 2 (until 2026-12): a file per tile; 1: raw detections. Older stores are cleared
LOG = "tiles.log"
LENGTH = 8  # bytes of a record's length, little-endian, before the record


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
        self.whole: int | None = None  # bytes of the log up to its last whole record, once read
        self.fd: int | None = None  # the log, open for appending from the first save
        if directory.exists():
            try:
                manifest = json.loads((directory / "manifest.json").read_text())
            except (OSError, ValueError):
                manifest = None
            if not isinstance(manifest, dict) or [manifest.get("fingerprint"), manifest.get("format")] != [key, FORMAT]:
                self.stale = True
                shutil.rmtree(directory)

    def saved(self, scene: int) -> Iterator[TileOutput]:
        """The saved tiles made under this store's fingerprint, each window once, read record by record."""
        seen: set[int] = set()
        end = 0
        for blob, end in records(self.directory / LOG):
            try:
                data = unpack(blob)
                fits = int(data["format"]) == FORMAT and data["fingerprint"].tobytes().decode() == self.key
                result = decode(data, scene) if fits else None
            except (ValueError, KeyError, TypeError):
                result = None  # damaged, or made under other settings: that tile simply runs again
            if result is not None and result.index not in seen:
                seen.add(result.index)
                yield result
        self.whole = end  # known only once every record is read

    def save(self, result: TileOutput) -> None:
        if self.fd is None:
            self.open()
        record = pack(encode(result, self.key))
        data = memoryview(len(record).to_bytes(LENGTH, "little") + record)
        while data:  # one call for a regular file, unless the disk fills up (which raises)
            data = data[os.write(self.fd, data):]

    def open(self) -> None:
        """Make the directory and manifest (once: a file system call costs as much as packing a tile) and open
        the log for appending, cut back to its last whole record."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not (self.directory / "manifest.json").exists():
            with atomic_path(self.directory / "manifest.json") as tmp:
                tmp.write_text(json.dumps({"fingerprint": self.key, "format": FORMAT}))
        whole = self.whole
        if whole is None:
            whole = max((end for _, end in records(self.directory / LOG)), default=0)
        self.fd = os.open(self.directory / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(self.fd).st_size > whole:
            os.ftruncate(self.fd, whole)  # a record cut short by a crash: what follows must be readable

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def records(path: Path) -> Iterator[tuple[bytes, int]]:
    """The whole records of a log, each with the offset where it ends; none when there is no log. A record
    cut short (a crash mid-write) ends the log."""
    try:
        log = open(path, "rb")
    except FileNotFoundError:
        return
    with log:
        length = os.fstat(log.fileno()).st_size
        while len(head := log.read(LENGTH)) == LENGTH:
            size = int.from_bytes(head, "little")
            if size > length - log.tell():  # never trust a length read from a damaged file
                return
            yield log.read(size), log.tell()


def saved_tiles(directory: Path) -> int:
    """How many whole records a store's log holds (the tests watch a run save tiles)."""
    return sum(1 for _ in records(Path(directory) / LOG))
