"""A real multi-process Ray cluster on this machine: `ray start --head`, a run that joins it with
`--ray-address`, and the same run submitted with `ray job submit`; both outputs equal the in-process run's.

The cluster uses token authentication (the default of `ray start` in recent Ray), with a token made for
the test, and is stopped (its whole process group) at the end.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyogrio
import pytest
import rasterio
import torch
from rasterio.windows import Window

from model.builder import build_model
from model.checkpoint import save_checkpoint
from model.config import load_config

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "samples" / "spacenet_atlanta" / "sample_geotiff.tif"
RUN_FLAGS = ["--tile", "128", "--overlap", "32", "--score-threshold", "0.05", "--batch-size", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_command() -> str:
    beside_python = Path(sys.executable).with_name("ray")
    found = str(beside_python) if beside_python.exists() else shutil.which("ray")
    if not found:
        pytest.skip("the `ray` command is not installed")
    return found


@dataclass
class Cluster:
    address: str
    dashboard: str
    env: dict[str, str]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not open port {port} in {seconds:.0f} s:\n{log.read_text()[-2000:]}")


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process group (it stops the head's services), then make sure."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)  # anything left in the group?
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    port, dashboard = free_port(), free_port()
    log = root / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [ray_command(), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats", "--block"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, head, log)
        wait_for_port(dashboard, head, log)
        yield Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env)
    finally:
        stop_group(head)


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A 256^2 crop of the bundled SpaceNet scene and a random-weight Swin-T checkpoint."""
    root = tmp_path_factory.mktemp("inputs")
    scene = root / "atlanta.tif"
    with rasterio.open(SAMPLE) as src:
        window = Window(320, 320, 256, 256)
        profile = {**src.profile, "width": 256, "height": 256, "transform": src.window_transform(window)}
        with rasterio.open(scene, "w", **profile) as dst:
            dst.write(src.read(window=window))
    torch.manual_seed(0)
    config = load_config("configs/swin_t.yaml", {"classes": ["building"]})
    checkpoint = root / "random.pt"
    save_checkpoint(checkpoint, build_model(config, num_classes=1), config, ["building"])
    return scene, checkpoint


def run_cli(args: list[str], env: dict[str, str], cwd: Path, retry_while: str | None = None) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
        if result.returncode == 0 or not retry_while or retry_while not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    return result


def features(path: Path) -> list[tuple]:
    frame = pyogrio.read_dataframe(path, layer="atlanta")
    return [(g.wkb, float(s), int(c)) for g, s, c in zip(frame.geometry, frame.score, frame.class_id)]


def test_runs_on_a_started_cluster_and_as_a_submitted_job_equal_the_in_process_run(tmp_path, cluster,
                                                                                     job_inputs):
    scene, checkpoint = job_inputs
    run = [sys.executable, "-m", "pipeline", "run", str(scene), "--checkpoint", str(checkpoint), *RUN_FLAGS]
    local_env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}

    run_cli([*run, "-o", str(tmp_path / "local.gpkg")], local_env, tmp_path)
    joined = run_cli([*run, "-o", str(tmp_path / "joined.gpkg"), "--ray-address", cluster.address], cluster.env,
                     tmp_path)
    # No flag inside a job: the entrypoint finds the cluster in $RAY_ADDRESS, which `ray job submit` sets.
    # The job agent comes up some seconds after the dashboard port opens; Ray says "try again later".
    submitted = run_cli([ray_command(), "job", "submit", "--address", cluster.dashboard, "--", *run, "-o",
                         str(tmp_path / "job.gpkg")], cluster.env, tmp_path, retry_while="No available agent")

    expected = features(tmp_path / "local.gpkg")
    assert len(expected) > 0
    assert features(tmp_path / "joined.gpkg") == expected  # same polygons, scores and row order
    assert features(tmp_path / "job.gpkg") == expected
    assert "(layer atlanta)" in joined.stdout and "succeeded" in submitted.stdout + submitted.stderr


def test_a_cluster_that_cannot_be_reached_is_one_line(tmp_path, job_inputs):
    scene, checkpoint = job_inputs
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(scene), "--checkpoint", str(checkpoint), "-o",
         str(tmp_path / "x.gpkg"), "--ray-address", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot connect to the Ray cluster at 127.0.0.1:")
    assert not (tmp_path / "x.gpkg").exists()
    assert time.monotonic() - started < 120  # not Ray's minutes of retries
