"""The Docker files: consistent with the project (torch pin, CUDA of that wheel, scripts), not root, token
authentication on every node; and `docker compose config` validates the compose file where a compose
command exists (no Docker engine is needed for that)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_image_matches_the_project_and_does_not_run_as_root():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    pyproject = (DOCKER.parent / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    assert f"torch=={torch_pin}" in dockerfile
    base = re.search(r"^FROM nvidia/cuda:(\d+\.\d+)\.\d+-\S*runtime\S*", dockerfile, re.M)
    assert base, "the image starts from a CUDA runtime base"
    if torch.version.cuda:  # the CUDA the pinned wheel was built for
        assert base.group(1) == torch.version.cuda
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    for script in ("start-head.sh", "start-worker.sh"):
        assert script in dockerfile
        assert subprocess.run(["bash", "-n", str(DOCKER / script)]).returncode == 0


def test_compose_has_a_head_and_gpu_workers_with_token_authentication():
    services = compose()["services"]
    assert set(services) == {"head", "worker"}
    for name, service in services.items():
        assert (DOCKER / service["command"].split()[-1].removeprefix("docker/")).exists()
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
        assert "RAY_AUTH_TOKEN" in service["environment"]
        assert any(v.endswith(":/data") for v in service["volumes"])
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["worker"]["environment"]["RAY_HEAD"] == "head:6379"


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_validates_the_file():
    command = compose_command()
    if command is None:
        pytest.skip("no `docker compose` / `docker-compose` here (apt-get install docker-compose to run this)")
    env = {"PATH": "/usr/bin:/bin", "RAY_AUTH_TOKEN": "test-token", "DATA_DIR": "/srv/aerial"}
    ok = subprocess.run([*command, "-f", str(DOCKER / "compose.yaml"), "config"], capture_output=True, text=True,
                        env=env)
    assert ok.returncode == 0, ok.stderr
    resolved = yaml.safe_load(ok.stdout)["services"]
    assert resolved["worker"]["environment"]["RAY_AUTH_TOKEN"] == "test-token"
    assert any(str(v).startswith("/srv/aerial:/data") or "/srv/aerial" in str(v) for v in resolved["head"]["volumes"])
    missing = subprocess.run([*command, "-f", str(DOCKER / "compose.yaml"), "config"], capture_output=True,
                             text=True, env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode != 0 and "RAY_AUTH_TOKEN" in missing.stderr  # no cluster without a token
