"""What a run reports: per scene, the counts, timings and warnings printed at the end and saved in the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import Interrupted


def interrupted(saved: list[tuple[int, int, Path]]) -> Interrupted:
    """Ctrl-C / SIGTERM during a run: what is saved where (done, total, folder per scene under way)."""
    where = ", ".join(f"{done} of {total} tiles saved in {state}" for done, total, state in saved)
    return Interrupted(f"interrupted: {where or 'no tiles saved'}; run the same command to resume")


@dataclass
class RunSummary:
    scene: str
    output: str
    tiles: int = 0
    tiles_nodata: int = 0
    tiles_resumed: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"window": [col, row, w, h], "error": ...}
    raw_instances: int = 0
    merged_instances: int = 0  # objects in the output
    left_out: int = 0  # objects under --min-area (or reduced to nothing by a repair)
    resubmitted_tiles: int = 0
    worker_restarts: int = 0
    stale_state_cleared: bool = False
    layer: str = ""  # of a format with layers (GeoPackage)
    up_to_date: bool = False  # the output already held this result (same scene, model and options): skipped
    seconds: dict[str, float] = field(default_factory=dict)
    timeline: dict[str, float] = field(default_factory=dict)  # wall-clock times (epoch s): first_tile, written
    score_threshold: float = 0.0
    dropped_scores: list[int] = field(default_factory=list)  # histogram over [0, 1] of the scores left out
    best_dropped_score: float = -1.0  # the highest score left out under the threshold (-1: none)
    warnings: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        where = f"{self.scene} -> {self.output}" + (f" (layer {self.layer})" if self.layer else "")
        if self.up_to_date:
            return [f"{where}: up to date, skipped (same scene, model and options; --overwrite to redo)"]
        out = [
            where,
            f"  tiles: {self.tiles} ({self.tiles_nodata} all-nodata skipped, {self.tiles_resumed} resumed from "
            f"a previous run, {self.resubmitted_tiles} re-submitted after a lost worker, "
            f"{self.worker_restarts} lost workers replaced)",
            f"  instances: {self.raw_instances} from tiles -> {self.merged_instances} after the seam merge"
            + (f" ({self.left_out} under --min-area left out)" if self.left_out else ""),
            "  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()),
        ]
        out += [f"  warning: {w}" for w in self.warnings]
        if self.failed:
            out.append(f"  INCOMPLETE: {len(self.failed)} tiles failed after retries (col, row, width, height):")
            out += [f"    window {f['window']}: {f['error']}" for f in self.failed[:20]]
        return out
