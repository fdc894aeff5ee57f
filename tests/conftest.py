"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_session():
    """A small in-process Ray (2 CPUs, no dashboard) for one test module, shut down after it.

    `address="local"` starts a new instance even when another Ray runs on this machine (a bare
    ray.init() would join it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
