"""Starting and joining Ray, and the command line around it.

A real multi-process Ray cluster on this machine: `ray start --head`, a run that joins it with
`--ray-address`, and the same run submitted with `ray job submit`; both outputs equal the in-process run's.
The cluster uses token authentication (the default of `ray start` in recent Ray), with a token made for
the test, and is stopped (its whole process group) at the end. Every Ray of this module starts while Ray's
default ports are held, as they are when the user already runs a Ray on the machine.

Addresses that are not a Ray GCS fail in one line within seconds; SIGTERM while a local Ray starts stops
it all (exit 130); a local Ray listens on loopback only; Ray's own warnings show only with --debug.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyogrio
import pytest
import rasterio
import torch
from rasterio.windows import Window

from model.builder import build_model
from model.checkpoint import save_checkpoint
from core.cluster import METRICS_PORTS_ANY, RAY_DEFAULT_PORTS, RayPorts
from model.config import load_config
from pipeline.cli import build_parser
from tests.test_prepare_ray import SCENES, write_labels, write_scene

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "samples" / "spacenet_atlanta" / "sample_geotiff.tif"
RUN_FLAGS = ["--tile", "128", "--overlap", "32", "--score-threshold", "0.05", "--batch-size", "2"]
# A line of Ray's own logging, Python's ("2026-... WARNING worker.py:12 -- ...") or its C++ core's ("[2026-... W 1 1]")
RAY_LOG_LINE = re.compile(r"^\[?\d{4}-\d\d-\d\d[ T][\d:,.]+\s+(\w+\s+\d+\s+\d+\]|(DEBUG|INFO|WARNING)\b)", re.M)


def closed_port() -> int:
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
def default_ports_held():
    """Ray's default ports taken, as by a Ray the user already runs here (one held by another process
    already is taken just the same)."""
    held = set()
    with contextlib.ExitStack() as stack:
        for port in RAY_DEFAULT_PORTS:
            s = stack.enter_context(socket.socket())
            with contextlib.suppress(OSError):
                s.bind(("0.0.0.0", port))
                s.listen()
                held.add(("0.0.0.0", port))
        yield held


def without_ray_auth(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, default_ports_held):
    root = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ports = RayPorts.free()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), **METRICS_PORTS_ANY)
    log = root / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [ray_command(), "start", "--head", *ports.start_flags(), "--num-cpus=2", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", "--disable-usage-stats", "--block"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(ports.gcs, head, log)
        wait_for_port(ports.dashboard, head, log)
        yield Cluster(f"127.0.0.1:{ports.gcs}", f"http://127.0.0.1:{ports.dashboard}", env)
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
    local_env = without_ray_auth(cluster.env)

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
    assert not RAY_LOG_LINE.search(joined.stderr), joined.stderr  # no Ray warnings around joining


def local_env() -> dict[str, str]:
    """This environment without a cluster to join, and without RAY_AUTH_MODE (which an in-process Ray of an
    earlier test may have set here): Ray then enables token authentication itself, with its notice."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # this checkout's code
    return env


def serve_silence() -> tuple[int, socket.socket]:
    """A TCP server that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def accept() -> None:
        held = []
        with contextlib.suppress(OSError):  # until the test closes the server
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1], server


def serve_http() -> tuple[int, http.server.HTTPServer]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], server


@pytest.mark.parametrize("kind, reason", [
    ("nothing", "nothing listens on that port"),
    ("silent", "the port accepted the connection but is not a Ray GCS server (it answered nothing in 5 s)"),
    ("http", "it answered but is not a Ray GCS server (it does not speak gRPC"),
])
def test_an_address_that_is_not_ray_is_one_line_within_seconds(tmp_path, job_inputs, kind, reason):
    scene, checkpoint = job_inputs
    with contextlib.ExitStack() as stack:
        if kind == "nothing":
            port = closed_port()
        elif kind == "silent":
            port, server = serve_silence()
            stack.callback(server.close)
        else:
            port, server = serve_http()
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", str(scene), "--checkpoint", str(checkpoint), "-o",
             str(tmp_path / "x.gpkg"), "--ray-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=300, env=local_env())
        seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()  # one line: no Ray warnings before it
    assert line.startswith(f"error: cannot connect to the Ray cluster at 127.0.0.1:{port}: ") and reason in line
    assert not (tmp_path / "x.gpkg").exists()
    assert seconds < 60  # a few seconds of imports and at most 5 s of probing, not Ray's minutes of retries


@pytest.mark.parametrize("token, reason", [
    (None, "the cluster requires token authentication and no token is set here: set RAY_AUTH_MODE=token"),
    ("0" * 64, "the cluster refused this token"),
])
def test_a_cluster_that_wants_a_token_says_so(tmp_path, cluster, job_inputs, token, reason):
    scene, checkpoint = job_inputs
    env = without_ray_auth(cluster.env)
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(scene), "--checkpoint", str(checkpoint), "-o",
         str(tmp_path / "x.gpkg"), "--ray-address", cluster.address],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot connect to the Ray cluster at {cluster.address}: ") and reason in line
    assert time.monotonic() - started < 60


@pytest.fixture(scope="module")
def prepare_job(tmp_path_factory) -> list[str]:
    """`prepare` of two tiny scenes on Ray (--workers 2): the lightest command that starts a local Ray."""
    root = tmp_path_factory.mktemp("prepare")
    scenes = []
    for seed, (name, width, height, crs, transform) in enumerate(SCENES[:2]):
        write_scene(root / f"{name}.tif", width, height, crs, transform, seed)
        scenes.append(str(root / f"{name}.tif"))
    write_labels(root / "labels.gpkg")
    return [sys.executable, "-m", "pipeline", "prepare", *scenes, "--labels", str(root / "labels.gpkg"),
            "--class-field", "kind", "--tile", "64", "--overlap", "16", "--workers", "2", "--overwrite"]


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if p.pid != sid and os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


@pytest.mark.parametrize("started", ["gcs_server", "raylet"])
def test_sigterm_while_ray_starts_stops_everything_with_130(tmp_path, prepare_job, started):
    """Ray's own SIGTERM handler exited with 15, without a word, and left its agents running."""
    proc = subprocess.Popen([*prepare_job, "--out", str(tmp_path / "out")], env=local_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: dict[int, float] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
            seen.update({c.pid: c.create_time() for c in children})
            if any(c.name() == started for c in children):
                break
        time.sleep(0.05)
    assert proc.poll() is None, f"{started} never appeared: {proc.communicate()}"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted"), err
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and session_processes(proc.pid):
        time.sleep(0.5)
    assert session_processes(proc.pid) == []
    for pid, created in seen.items():  # also none that left the session
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            assert p.create_time() != created or p.status() == psutil.STATUS_ZOMBIE, p.cmdline()


def test_debug_is_accepted_before_and_after_the_command():
    parse = build_parser().parse_args
    assert parse(["run", "x.tif"]).debug is False
    assert parse(["--debug", "run", "x.tif"]).debug is True
    assert parse(["run", "x.tif", "--debug"]).debug is True
    assert parse(["prepare", "x.tif", "--labels", "l.gpkg", "--out", "o", "--debug"]).debug is True


def test_ray_warnings_show_only_with_debug(tmp_path, prepare_job):
    quiet = subprocess.run([*prepare_job, "--out", str(tmp_path / "quiet")], env=local_env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    loud = subprocess.run([*prepare_job, "--out", str(tmp_path / "loud"), "--debug"], env=local_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "Token authentication is enabled" in loud.stderr  # Ray's notice, which --debug lets through
    assert "Token authentication" not in quiet.stderr and not RAY_LOG_LINE.search(quiet.stderr), quiet.stderr
    assert "train" in quiet.stdout


def listeners(processes: list[psutil.Process]) -> dict[tuple[str, int], str]:
    found = {}
    for p in processes:
        with contextlib.suppress(psutil.Error):
            name = p.name()
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found[c.laddr.ip, c.laddr.port] = name
    return found


def this_session() -> list[psutil.Process]:
    """This process and those it started in its session (not the `ray start` head's, which has its own)."""
    me = psutil.Process()
    found = [me]
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(child.pid) == os.getsid(0):
                found.append(child)
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def test_a_local_ray_listens_on_loopback_only_and_off_the_default_ports(default_ports_held, ray_session):
    """The suite's Ray (started as the commands start it) works while another Ray holds the default ports, and
    nothing of it listens beyond this machine: GCS, raylet, agents, metrics servers, workers, driver."""
    import ray

    assert ray.get(ray.remote(lambda: 6 * 7).remote()) == 42
    found: dict = {}
    deadline, stable_since = time.monotonic() + 60, time.monotonic()
    while time.monotonic() < deadline:  # the agents open their servers some seconds after ray.init returns
        now = {k: v for k, v in listeners(this_session()).items() if k not in default_ports_held}
        if now != found:
            found, stable_since = now, time.monotonic()
        names = set(found.values())
        if {"ray::DashboardAgent", "ray::RuntimeEnvAgent", "gcs_server", "raylet"} <= names \
                and time.monotonic() - stable_since > 3:
            break
        time.sleep(0.5)
    assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent", "gcs_server", "raylet"} <= set(found.values()), found
    assert len(found) >= 8, found  # driver, GCS, raylet x2, agents x4, metrics servers x2, workers
    assert [f"{name} {ip}:{port}" for (ip, port), name in found.items() if not is_loopback(ip)] == []
    assert [f"{name} :{port}" for (ip, port), name in found.items() if port in RAY_DEFAULT_PORTS] == []
    assert int(ray.get_runtime_context().gcs_address.rpartition(":")[2]) in {port for _, port in found}
