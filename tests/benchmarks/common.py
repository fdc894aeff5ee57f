"""Shared pieces of the benchmarks: generated scenes, a cheap predictor, peak-memory sampling."""

from __future__ import annotations

import os
import platform
from importlib.metadata import version
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import rasterio
from affine import Affine


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {version('torch')}, {platform.python_version()}"


def generate_scene(path: Path, size: int, block: int = 512, seed: int = 0) -> Path:
    """A tiled, deflate-compressed RGB GeoTIFF of `size` x `size` px with bright squares, written block by
    block so generating a 20 000 px scene never holds it in memory."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32616",
                   transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000), tiled=True, blockxsize=512,
                   blockysize=512, compress="deflate")
    tmp = path.with_suffix(".partial.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, size, block):
            for col in range(0, size, block):
                h, w = min(block, size - row), min(block, size - col)
                data = rng.integers(40, 90, (3, h, w), dtype=np.uint8)
                for _ in range(4):
                    y, x = rng.integers(0, max(h - 40, 1)), rng.integers(0, max(w - 40, 1))
                    data[:, y:y + 30, x:x + 30] = 230
                dst.write(data, window=rasterio.windows.Window(col, row, w, h))
    tmp.rename(path)
    return path


class BrightSquares:
    """A cheap predictor: each connected bright region of the first channel is one instance, as a real
    model would report separate objects (about 4 per 512 px block in `generate_scene`)."""

    class_names = ["square"]

    def __call__(self, images):
        import torch
        from scipy import ndimage

        out = []
        for image in images:
            labels, n = ndimage.label((image[0] > 0.8).numpy())
            slices = ndimage.find_objects(labels)
            masks = torch.zeros((n, 1, *labels.shape))
            for i in range(n):
                masks[i, 0] = torch.from_numpy(labels == i + 1)
            boxes = torch.tensor([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in slices],
                                 dtype=torch.float32).reshape(-1, 4)
            out.append({"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64), "scores": torch.full((n,), 0.9),
                        "masks": masks})
        return out


class PeakMemory:
    """Peak memory of this process and every process it started, summed at each sample.

    With Ray started in-process that is the driver, Ray's own daemons (GCS, raylet) and every worker; for a
    single-process tool, the process alone. Two sums: RSS, which counts a shared library once per process
    that maps it, and PSS, which splits shared pages between the processes that share them, so the PSS sum
    is the physical memory the tool occupies.
    """

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self.peak_pss, self._stop = interval, 0, 0, threading.Event()

    @staticmethod
    def sample() -> tuple[int, int]:
        me = psutil.Process()
        rss = pss = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):  # ended between listing and reading
                continue
            rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
        return rss, pss

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = self.sample()
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def publish(section: str, command: str, lines: list[str], figure: str | None = None) -> None:
    """Print the figures and replace this benchmark's section of docs/benchmarks.md with them; `figure`: an
    image to show under them (a path relative to docs/)."""
    shown = ["", f"![{section}]({figure})"] if figure else []
    body = "\n".join([f"Command: `{command}`  ", f"Machine: {machine()}  ",
                      f"Measured: {time.strftime('%Y-%m-%d')}", "", "```", *lines, "```", *shown])
    print("\n".join(lines))
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n## {section}\n\n{block}\n"
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
