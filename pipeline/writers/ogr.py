"""GDAL formats written as one stream: `pyogrio.raw.write_arrow` reads Arrow batches as the run makes them.

Some GDAL drivers cannot append to a file they closed (FlatGeobuf), or reload the whole file to append
(GeoJSON), and reopening a GeoPackage for each batch costs twice the CPU of streaming into it, so a file of
these formats is written by one `write_arrow` call that lasts as long as the writer: it runs on a thread of
its own and pulls batches from a short queue that `write` fills. The queue holds at most `QUEUED` batches,
so memory stays flat whatever the scene holds; an error of the driver stops the run at its next batch. A
format is a subclass naming its driver and creation options.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import pyarrow as pa
import pyogrio.raw

from pipeline.features import Rows
from pipeline.writers.arrow import GEOMETRY, SCHEMA, record_batch
from pipeline.writers.base import Writer

QUEUED = 2  # batches waiting for the driver
STOP = object()  # queued by `discard`: the stream ends in an error, the driver closes its file


class Stopped(Exception):
    """The writer was discarded: its stream ends here."""


class StreamWriter(Writer):
    driver: ClassVar[str] = ""
    layer_options: ClassVar[dict[str, Any]] = {}

    def open(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUED)
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self.stream, name=f"write {self.path.name}", daemon=True)
        self.thread.start()

    def creation_options(self) -> dict[str, Any]:
        """The driver's creation options for the `write_arrow` call (`layer_options`, `dataset_options`)."""
        return {"layer_options": self.layer_options}

    def stream(self) -> None:
        """The driver's side (own thread): write every batch queued until the end mark."""
        try:
            pyogrio.raw.write_arrow(pa.RecordBatchReader.from_batches(SCHEMA, self.batches()), self.tmp,
                                    driver=self.driver, layer=self.layer, geometry_name=GEOMETRY,
                                    geometry_type="MultiPolygon", crs=self.crs.to_wkt(), encoding="UTF-8",
                                    **self.creation_options())
        except BaseException as error:  # raised on the run's side at its next batch or at close
            self.failure = error

    def batches(self) -> Iterator[pa.RecordBatch]:
        while (item := self.queue.get()) is not None:
            if item is STOP:
                raise Stopped("the output was discarded")
            yield item

    def put(self, item: Any) -> None:
        """Queue `item` for the driver, waiting while the queue is full, unless the driver has stopped."""
        while True:
            if self.failure is not None:
                raise self.failure
            if not self.thread.is_alive():
                raise RuntimeError(f"{self.path}: the {self.title} writer stopped")
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def append(self, rows: Rows, class_names: Sequence[str]) -> None:
        if len(rows):
            self.put(record_batch(rows, class_names))

    def close(self) -> None:
        self.put(None)
        self.thread.join()
        if self.failure is not None:
            raise self.failure

    def discard(self) -> None:
        if not hasattr(self, "thread"):
            return
        while self.thread.is_alive():  # empty the queue so the end mark gets in, then wait for the driver
            try:
                self.queue.get_nowait()
            except queue.Empty:
                pass
            try:
                self.queue.put(STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        self.thread.join()
