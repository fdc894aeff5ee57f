"""Starting or joining Ray: one way for every command that uses it (run, prepare, train --workers).

A Ray started here listens on this machine's loopback only, on ports the OS picks (never Ray's fixed defaults,
which a Ray the user already runs may hold), and an interrupt while it starts waits until it has started, so
that stopping it stops every process it made. An address to join is asked what it is before Ray is let at it:
Ray retries a wrong address for minutes, with walls of warnings.

Free of torch, so light jobs (`prepare`) start Ray without importing it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

from core.errors import UserError, first_line

# The GCS method that every Ray GCS serves and answers at once; asked with an empty request (all defaults).
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
TOKEN_HELP = ("set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or the file "
              "~/.ray/auth_token)")
# The connection connect_ray made last (GCS address, job id), for release_ray.
_connected_here: tuple[str, str] | None = None
# Ray's fixed default ports: GCS, dashboard, Ray Client, dashboard agent HTTP, autoscaler and dashboard metrics.
# A Ray the user already runs on this machine holds them; a second Ray collides with it there.
RAY_DEFAULT_PORTS = (6379, 8265, 10001, 52365, 44217, 44227)
# The two metrics servers whose ports Ray takes only from its processes' environment; 0: any free port.
METRICS_PORTS_ANY = {"AUTOSCALER_METRIC_PORT": "0", "DASHBOARD_METRIC_PORT": "0"}


@dataclass(frozen=True)
class RayPorts:
    """The ports of a `ray start --head` on this machine that clients must know, chosen free; every other
    server of it takes any free port when it binds (port 0: no race with other programs)."""

    gcs: int
    dashboard: int
    ray_client: int

    @classmethod
    def free(cls) -> "RayPorts":
        """Ports the OS reports free on every interface now (all held until all are chosen: no duplicates)."""
        with contextlib.ExitStack() as stack:
            sockets = []
            for _ in range(len(cls.__dataclass_fields__)):
                s = stack.enter_context(socket.socket())
                s.bind(("", 0))
                sockets.append(s)
            return cls(*(s.getsockname()[1] for s in sockets))

    def start_flags(self) -> list[str]:
        """`ray start --head` options; run it with METRICS_PORTS_ANY in its environment."""
        return [f"--port={self.gcs}", f"--dashboard-port={self.dashboard}",
                f"--ray-client-server-port={self.ray_client}", "--node-manager-port=0", "--object-manager-port=0",
                "--dashboard-agent-listen-port=0", "--dashboard-agent-grpc-port=0", "--metrics-export-port=0",
                "--runtime-env-agent-port=0", "--min-worker-port=0", "--max-worker-port=0"]


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address`, else the one in $RAY_ADDRESS (which `ray job submit` sets for its
    entrypoint, so a submitted command needs no flag), else start Ray in-process on this machine
    (`num_cpus`, default: all its cores).

    Returns True when this call connected (the caller shuts Ray down afterwards) and False when Ray was
    already running in this process (a notebook, a test), which is then left as it is.
    """
    import ray

    global _connected_here
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        join_ray(address)
    else:
        start_local_ray(num_cpus or os.cpu_count() or 1)
    _connected_here = _connection()
    return True


def _connection() -> tuple[str, str]:
    import ray

    context = ray.get_runtime_context()
    return context.gcs_address, context.get_job_id()


def join_ray(address: str) -> None:
    """Connect this process to the cluster at `address`; one line saying why when it cannot."""
    import ray

    check_reachable(address)
    try:
        with _handlers_kept_through_init():
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except BaseException as exc:
        ray.shutdown()  # a half-made connection
        if not isinstance(exc, Exception):
            raise
        detail = first_line(exc)
        if "auth" in str(exc).lower() or "token" in str(exc).lower():
            detail += f"; the cluster uses token authentication: {TOKEN_HELP}"
        raise UserError(f"cannot connect to the Ray cluster at {address}: {detail}") from None


def start_local_ray(num_cpus: int) -> None:
    """Start Ray in this process: on loopback only, no dashboard, no worker logs here, and every server on
    a port the OS picks when it binds, never one of Ray's fixed defaults (RAY_DEFAULT_PORTS).

    "local": a new instance even when a `ray start` cluster runs on this machine, which a bare ray.init()
    would silently join. SIGINT and SIGTERM wait until Ray has started (a few seconds), then Ray is shut down
    and the signal delivered: an interrupt in the middle of ray.init leaves agents running that nothing stops.
    """
    import ray

    with _handlers_kept_through_init(), _signals_held() as held:
        try:
            with _local_instance():
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_port=0,
                         log_to_driver=False, configure_logging=False)
        except BaseException:
            ray.shutdown()
            raise
    _deliver(held)


def release_ray() -> None:
    """Shut down the Ray that connect_ray connected to or started, if this process still is on it.

    Every exit path of the CLI calls it: an error between connecting and the caller's own shutdown leaves
    no Ray processes behind. A Ray connected otherwise (a notebook's, a test's) is left alone.
    """
    global _connected_here
    ray = sys.modules.get("ray")
    connection, _connected_here = _connected_here, None
    if not connection or ray is None or not ray.is_initialized():
        return
    try:
        ours = _connection() == connection
    except Exception:  # a Ray too broken to say which it is: the one connected here last
        ours = True
    if ours:
        shutdown_ray()


def shutdown_ray() -> None:
    """ray.shutdown with SIGINT and SIGTERM held until it is done (interrupted, it leaves processes behind)."""
    import ray

    with _signals_held() as held:
        ray.shutdown()
    _deliver(held)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for the duration of a block: joined or started on entry, shut down on exit if done here."""
    started = connect_ray(address)
    try:
        yield
    finally:
        if started:
            shutdown_ray()


def check_reachable(address: str, seconds: float = 5.0) -> None:
    """Ask `address` whether it is a Ray GCS that lets this process in, in at most ~2 x `seconds`.

    Ray itself retries an address where nothing listens or something else answers for minutes, printing
    dozens of warnings, and reports a cluster that wants a token as "Failed to connect". `auto` means the
    cluster this machine's `ray start` recorded last, which may have stopped since.
    """
    host_port = address.split("://", 1)[-1]
    if address == "auto":
        try:  # Ray's own lookup of that record (a private helper: if it moves, Ray's own errors remain)
            from ray._private.services import canonicalize_bootstrap_address

            host_port = canonicalize_bootstrap_address(address) or ""
        except Exception:
            return
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        return
    host = host.strip("[]")
    where = f"{address} ({host_port})" if address == "auto" else address

    def refuse(reason: str) -> UserError:
        return UserError(f"cannot connect to the Ray cluster at {where}: {reason}")

    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except ConnectionRefusedError:
        raise refuse("nothing listens on that port") from None
    except TimeoutError:
        raise refuse(f"no answer within {seconds:g} s (host down, or a firewall?)") from None
    except OSError as exc:
        raise refuse(first_line(exc)) from None
    if "://" not in address:  # ray:// is the Ray Client's port, which serves no GCS methods
        problem = _probe_gcs(host_port, seconds, send_stored_token=address == "auto")
        if problem:
            raise refuse(problem)


def _probe_gcs(host_port: str, seconds: float, send_stored_token: bool) -> str | None:
    """None if a Ray GCS answers at `host_port` and accepts this process's token, else what is wrong."""
    try:
        import grpc  # with ray[default]
    except ImportError:
        return None
    metadata = _token_header(ignore_auth_mode=send_stored_token)
    with grpc.insecure_channel(host_port) as channel:
        try:
            channel.unary_unary(GCS_PROBE_METHOD)(b"", timeout=seconds, metadata=metadata)
            return None
        except grpc.RpcError as exc:
            code = exc.code()
    not_gcs = "is not a Ray GCS server ({}); give the head's address (`ray start --head --port`, 6379 by default)"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if metadata:
            return "the cluster refused this token (RAY_AUTH_TOKEN or ~/.ray/auth_token): use the cluster's own"
        return f"the cluster requires token authentication and no token is set here: {TOKEN_HELP}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "the port accepted the connection but " + not_gcs.format(f"it answered nothing in {seconds:g} s")
    if code == grpc.StatusCode.UNAVAILABLE:
        return "it answered but " + not_gcs.format("it does not speak gRPC: an HTTP server, or another service?")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "it answered but " + not_gcs.format("a gRPC service without Ray's GCS; a Ray Client port needs ray://")
    return None  # something else went wrong on a server that speaks gRPC: let Ray try and say


def _token_header(ignore_auth_mode: bool) -> list[tuple[str, str]]:
    """The authorization header Ray would send: its token when token authentication is on here."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        header = AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=ignore_auth_mode)
        return list(header.items())
    except Exception:
        return []


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """What ray.init installs for SIGTERM: exit, through atexit, where Ray shuts its processes down."""
    sys.exit(signum)


@contextlib.contextmanager
def _handlers_kept_through_init() -> Iterator[None]:
    """The caller's SIGTERM handler stays while ray.init runs and after.

    ray.init puts in its own at its start, which exits with status 15 at once (in the middle of starting
    Ray's processes, or of the caller's work later). A caller without a handler of its own gets Ray's
    afterwards, as it would have.
    """
    with contextlib.ExitStack() as stack:
        try:
            from ray._private import utils

            if hasattr(utils, "set_sigterm_handler"):  # a private helper: if it moves, Ray's handler returns
                stack.enter_context(mock.patch.object(utils, "set_sigterm_handler", lambda handler: None))
        except ImportError:
            pass
        yield
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)):
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """SIGINT and SIGTERM received in the block are collected in the yielded list instead of handled;
    the handlers in place before come back at its end (deliver the signals then with _deliver)."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread has handlers
        yield held
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _deliver(held: list[int]) -> None:
    """Deliver the signals held while Ray started, to the handlers now in place; if one raises (Ctrl-C,
    the CLI's SIGTERM), shut the Ray of this process down first."""
    import ray

    try:
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)
    except BaseException:
        ray.shutdown()
        raise


@contextlib.contextmanager
def _local_instance() -> Iterator[None]:
    """Make the Ray that ray.init starts listen on loopback only, off Ray's fixed default ports, and start no
    autoscaler monitor: an instance of a fixed size in this process has nothing to scale, and ray.shutdown
    waits a full second for the monitor to give up after SIGTERM (1.0 of the 1.4 s it takes here).

    Ray binds its servers to the node's address, which on Linux is the machine's network address unless
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (then it is loopback, as on a laptop); that switch is read when Ray is
    imported, here and in every process Ray starts (they inherit this environment). ray.init picks the GCS
    port itself and takes no dashboard agent port (52365 unless given): it is given to the parameters it
    builds.
    """
    from ray._private import parameter, ray_constants

    base = parameter.RayParams

    defaults = {"dashboard_agent_listen_port": 0, "no_monitor": True}
    defaults = {k: v for k, v in defaults.items() if k in inspect.signature(base).parameters}

    class Params(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **{**defaults, **kwargs})

    environment = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **METRICS_PORTS_ANY}
    saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False))
            if defaults:
                stack.enter_context(mock.patch.object(parameter, "RayParams", Params))
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def in_flight(next_item: Callable[[], Any], start: Callable[[Any], Any],
              room: Callable[[int], bool]) -> Iterator[tuple[Any, Any]]:
    """The one loop that keeps Ray busy with bounded work, for `run` (batches on model actors) and `prepare`
    (parts as tasks): `start(item)` submits an item and returns its ObjectRef, as long as `room(running)` says
    there is room and `next_item()` has one (None: none now); each (item, finished ref) is yielded as its work
    ends, in the order they end. The loop ends when nothing runs and nothing is left.

    Items are asked for only when there is room, so `next_item` may plan as it goes, and the consumer may
    queue more (a retry) between yields. On any exit (an error, Ctrl-C, the consumer stopping) the work still
    running is cancelled.
    """
    import ray

    pending: dict[Any, Any] = {}
    try:
        while True:
            while room(len(pending)) and (item := next_item()) is not None:
                pending[start(item)] = item
            if not pending:
                return
            done, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), done[0]
    finally:
        for ref in pending:
            ray.cancel(ref)


def lost_worker_errors() -> tuple[type[BaseException], ...]:
    """What Ray raises for a call whose worker (process, node) is gone, as opposed to the call's own error."""
    import ray

    e = ray.exceptions
    return (e.RayActorError, e.WorkerCrashedError, e.ObjectLostError, e.OutOfMemoryError)


class SideCall:
    """`fn(*args)`, a short job of the driver's (a scene's overview read, the quicklook's outlines and page),
    sent to run elsewhere (`ref`: its Ray reference) or, without one, run here when its result is asked for.
    Where it ran is a matter of speed only: if that worker was lost, `result` computes it here."""

    def __init__(self, fn: Callable, args: tuple, ref: Any = None):
        self.fn, self.args, self.ref = fn, args, ref

    @classmethod
    def here(cls, fn: Callable, *args: Any) -> SideCall:
        return cls(fn, args)

    def result(self) -> Any:
        if self.ref is not None:
            import ray

            try:
                return ray.get(self.ref)
            except lost_worker_errors():
                pass
        return self.fn(*self.args)


def check_gpus(device: str, needed: float = 1.0) -> None:
    """Refuse `--device cuda` up front when the GPUs are not there: on the Ray cluster this process is
    connected to (its GPU resources), else on this machine. Without the check a Ray job waits forever for
    GPUs and a local one fails deep inside torch."""
    if device != "cuda":
        return
    import ray

    if ray.is_initialized():
        have, where = float(ray.cluster_resources().get("GPU", 0.0)), "the Ray cluster has"
    else:
        import torch

        have, where = float(torch.cuda.device_count() if torch.cuda.is_available() else 0), "this machine has"
    if have < needed:
        raise UserError(f"--device cuda needs {needed:g} GPUs but {where} {have:g}")
