"""Starting or joining Ray, the same way for every command that uses it.

Kept free of torch so light jobs (`prepare`) start their Ray workers without importing it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from model.errors import UserError


def start_ray(address: str | None) -> bool:
    """Join the Ray cluster at `address` ('auto', HOST:PORT) or, without one, start Ray in-process on this
    machine's CPUs (no dashboard, worker logs kept off the terminal). True when Ray was started here, so
    only the caller that started it shuts it down; a Ray already running in this process is reused."""
    import ray

    if ray.is_initialized():
        return False
    # Ray installs a fatal SIGTERM handler of its own; keep the caller's (SIGTERM = save and stop).
    previous = signal.getsignal(signal.SIGTERM)
    if address:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as exc:
            raise UserError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    else:  # "local": a Ray of our own even when `ray start` left a cluster running on this machine
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    if callable(previous) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
    return True


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for the duration of a block: started (or joined) on entry, shut down on exit if started here."""
    import ray

    started = start_ray(address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
