"""The writer interface every output format implements, and what all formats share.

A writer is a context manager: entering it opens a temporary file beside the output, `write` streams one
batch of rows into it (memory stays flat however many objects a scene holds), `set_metadata` says what
produced the rows, and leaving the block without error finishes the file and renames it into place, so an
output appears complete or not at all. On any error, Ctrl-C included, the temporary files go and a
previous output stays as it was. The run spine (`scene_run`) knows only this interface; which class
writes which suffix is `pipeline.writers.WRITERS`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pyproj import CRS

from core.files import atomic_path
from pipeline.features import Rows
from pipeline.style import write_style_file

METADATA_KEY = "aerial_seg_run"  # the run metadata's key wherever a format keeps key-value metadata


def sidecar(output: Path, suffix: str) -> Path:
    """`out.gpkg` -> `out.quicklook.png`, `out.report.json`, `out.qml`."""
    return output.with_name(output.stem + suffix)


class Writer:
    """Base of the output formats. A format implements `append` (one batch into `self.tmp`) and, where it
    needs them, `open`, `close`, `place` and `discard`; `recorded` when it keeps the run metadata itself.

    `class_names`: names of class ids 1, 2, ..., for the style; `keep_other_layers`: (formats with
    `layers` only) the new file starts as a copy of the one at `path`, so one file collects a layer per
    scene.
    """

    title: ClassVar[str] = ""  # the format's name in messages
    layers: ClassVar[bool] = False  # one file can hold several scenes as layers
    records_run: ClassVar[bool] = False  # the run metadata lives in the file; else the report beside it

    def __init__(self, path: str | Path, crs: CRS | str, layer: str = "instances",
                 metadata: dict[str, Any] | None = None, overwrite: bool = False,
                 class_names: Sequence[str] | None = None, keep_other_layers: bool = False):
        if keep_other_layers and not self.layers:
            raise ValueError(f"{self.title} holds one layer: keep_other_layers does not apply")
        self.path, self.crs, self.layer = Path(path), CRS.from_user_input(crs), layer
        self.overwrite, self.keep_other_layers = overwrite, keep_other_layers
        self.classes = {i + 1: str(name) for i, name in enumerate(class_names or [])}
        self.count = 0
        self.metadata: dict[str, Any] = {}
        self.set_metadata(metadata or {})

    @classmethod
    def files(cls, path: Path) -> list[Path]:
        """Every file the output at `path` is made of (checked against the run's inputs before any work)."""
        return [path] if cls.layers else [path, sidecar(path, ".qml")]

    @classmethod
    def recorded(cls, path: Path, layer: str) -> dict[str, Any] | None:
        """The run metadata kept in the output itself (formats with `records_run`); None if there is none."""
        return None

    def set_metadata(self, metadata: dict[str, Any]) -> None:
        """What produced the output; what is set when the writer closes is what the output keeps."""
        self.metadata = metadata

    def write(self, rows: Rows, class_names: Sequence[str]) -> None:
        """Append one batch: WKB MultiPolygons in the writer's CRS and their attributes (`class_names`: the
        name of each row's class)."""
        self.append(rows, class_names)
        self.classes.update(zip(rows.class_ids.tolist(), (str(n) for n in class_names)))
        self.count += len(rows)

    def __enter__(self) -> Writer:
        self._atomic = atomic_path(self.path, overwrite=self.overwrite or self.keep_other_layers)
        self.tmp = self._atomic.__enter__()
        try:
            self.open()
        except BaseException as error:
            self._atomic.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                self.close()
                self.style()
                self.place()
            except BaseException as error:
                self.discard()
                self._atomic.__exit__(type(error), error, error.__traceback__)  # removes the temporary file
                raise
        else:
            with contextlib.suppress(Exception):  # the block's own error is the one to report
                self.discard()
        return bool(self._atomic.__exit__(exc_type, exc, tb))

    # --- what a format implements ---------------------------------------------------------------------
    def open(self) -> None:
        """Start writing `self.tmp` (the block is entered)."""

    def append(self, rows: Rows, class_names: Sequence[str]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Finish `self.tmp` with the metadata as it stands now; it is renamed onto `path` right after."""

    def style(self) -> None:
        """QGIS style: `NAME.qml` beside the output, which QGIS loads with the layer (written before the
        output appears, so a complete output always has its style)."""
        write_style_file(sidecar(self.path, ".qml"), self.classes or {1: "object"})

    def place(self) -> None:
        """Move files other than `self.tmp` into place (formats made of several files); `self.tmp` is
        renamed onto `path` last."""

    def discard(self) -> None:
        """Stop writing after an error and remove what `self.tmp` is not (it is removed by the caller)."""
