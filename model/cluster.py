"""Starting or joining Ray: one way for every command that uses it (run, prepare, train --workers).

Free of torch, so light jobs (`prepare`) start Ray without importing it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator

from model.errors import UserError, first_line


def connect_ray(address: str | None) -> bool:
    """Join the Ray cluster at `address`, else the one in $RAY_ADDRESS (which `ray job submit` sets for its
    entrypoint, so a submitted command needs no flag), else start Ray in-process on this machine's cores.

    Returns True when this call connected (the caller shuts Ray down afterwards) and False when Ray was
    already running in this process (a notebook, a test), which is then left as it is.
    """
    import ray

    if ray.is_initialized():
        return False
    # Ray installs a fatal SIGTERM handler of its own; keep the caller's (SIGTERM = save and stop).
    previous = signal.getsignal(signal.SIGTERM)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as exc:
            detail = first_line(exc)
            if "auth" in str(exc).lower() or "token" in str(exc).lower():
                detail += ("; the cluster uses token authentication: set RAY_AUTH_MODE=token and its token "
                           "(RAY_AUTH_TOKEN, or the file ~/.ray/auth_token)")
            raise UserError(f"cannot connect to the Ray cluster at {address}: {detail}") from None
    else:
        # "local": a new in-process instance even when a `ray start` cluster runs on this machine, which
        # a bare ray.init() would silently join
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    if callable(previous) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
    return True


def check_reachable(address: str, seconds: float = 10.0) -> None:
    """Ray retries an address where nothing listens for minutes; say so at once instead.

    `auto` means the cluster this machine's `ray start` recorded last, which may have stopped since.
    """
    host_port = address.split("://", 1)[-1]
    if address == "auto":
        try:  # Ray's own lookup of that record (a private helper: if it moves, Ray's own errors remain)
            from ray._private.services import canonicalize_bootstrap_address

            host_port = canonicalize_bootstrap_address(address) or ""
        except Exception:
            return
    if ":" not in host_port:
        return
    host, _, port = host_port.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {exc}") from None


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for the duration of a block: joined or started on entry, shut down on exit if done here."""
    import ray

    started = connect_ray(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
