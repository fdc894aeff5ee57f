"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_session():
    """A small in-process Ray (2 CPUs) for one test module, shut down after it.

    Started the way the commands start it (core.cluster.start_local_ray): a new instance even when another
    Ray runs on this machine, on loopback only, every port chosen free (never Ray's defaults, which another
    Ray on the machine may hold)."""
    from core.cluster import shutdown_ray, start_local_ray

    start_local_ray(num_cpus=2)
    yield
    shutdown_ray()
