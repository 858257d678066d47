"""compose.yaml and the Dockerfile cannot be started here; they are validated against the code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from node.cli import build_parser
from node.config import ENV_PREFIX, NodeConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _parses(command: list[str]) -> None:
    assert command[0] == "infernode"
    build_parser().parse_args(command[1:])  # SystemExit (a failed test) on an unknown flag


def test_compose_has_nats_with_jetstream_on_a_persistent_volume(compose):
    """Given compose.yaml, NATS runs JetStream with its store on a named volume and a healthcheck."""
    nats = compose["services"]["nats"]
    assert nats["image"].startswith("nats:")
    command = nats["command"]
    assert "--jetstream" in command
    store = command[command.index("--store_dir") + 1]
    volumes = {v.split(":")[0]: v.split(":")[1] for v in nats["volumes"]}
    assert store in volumes.values()
    assert set(volumes) <= set(compose["volumes"])
    assert "healthz" in " ".join(nats["healthcheck"]["test"])


def test_compose_node_command_and_env_match_the_cli_and_config(compose):
    """The node's command parses with the real CLI; each INFERNODE_* variable is a real setting."""
    node = compose["services"]["node"]
    _parses(node["command"])
    fields = {f.name for f in dataclasses.fields(NodeConfig)}
    for var in node["environment"]:
        assert var.startswith(ENV_PREFIX)
        assert var[len(ENV_PREFIX):].lower() in fields, var
    assert node["depends_on"]["nats"]["condition"] == "service_healthy"
    _parses(node["healthcheck"]["test"][1:])
    mounts = {v.split(":")[1] for v in node["volumes"]}
    assert {"/models", "/data"} <= mounts
    assert "--nats-url" in node["command"] and "nats://nats:4222" in node["command"]


def test_compose_demo_profile_runs_agents_with_a_real_cli_command(compose):
    """The demo profile's agents run `infernode demo mesh` with flags the CLI accepts."""
    agents = compose["services"]["agents"]
    assert agents["profiles"] == ["demo"]
    _parses(agents["command"])
    assert agents["command"][1:3] == ["demo", "mesh"]


def test_dockerfile_installs_every_package_the_project_ships():
    """The Dockerfile copies each top-level package of pyproject.toml and installs the project."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = set(re.findall(r'"(\w+)\*?"', pyproject.split("[tool.setuptools.packages.find]")[1]
                              .split("[")[0]))
    for package in packages:
        assert f"COPY {package} ./{package}" in dockerfile, package
    assert re.search(r"^RUN pip install \.", dockerfile, re.M)
    cmd = re.search(r'^CMD (\[.*\])$', dockerfile, re.M)
    assert cmd is not None
    _parses(yaml.safe_load(cmd.group(1)))
