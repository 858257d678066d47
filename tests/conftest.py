"""Shared fixtures: a real nats-server with JetStream per test, a client, the tiny model, nodes.

Every server picks its own free port; nothing here is a fake broker.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import pytest
from nats.aio.client import Client

from node.nats_server import EmbeddedNats
from tests.nats_cluster import NatsCluster

if TYPE_CHECKING:
    from node.app import Node
    from tests.support.sessions import LogWatch


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A fresh nats-server with JetStream in this test's temporary directory."""
    async with EmbeddedNats(tmp_path / "nats") as server:
        yield server


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """Three nats-servers with JetStream routed on loopback, a meta leader elected."""
    async with NatsCluster(tmp_path / "cluster") as cluster:
        yield cluster


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    """A client connected to ``nats_server``; drained after the test."""
    client = await nats.connect(nats_server.url, name="test-client")
    yield client
    if not client.is_closed:
        with contextlib.suppress(Exception):
            await client.drain()


@pytest.fixture
async def logs() -> AsyncIterator[LogWatch]:
    """The structlog events logged during the test, with waits on them."""
    from tests.support.sessions import watching_logs

    with watching_logs() as watch:
        yield watch


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's own tiny random-weight llama GGUF, written once per test run."""
    from node.demo_model import write_llama_gguf

    return write_llama_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf")


MakeNode = Callable[..., Awaitable["Node"]]


@pytest.fixture
async def make_node(
    nats_server: EmbeddedNats, tiny_model: Path, tmp_path: Path
) -> AsyncIterator[MakeNode]:
    """Start nodes on the tiny model; all are stopped, and extra servers too, after the test.

    ``make_node()`` joins ``nats_server``; ``fresh_server=True`` starts another server the
    fixture owns (it outlives the node, so a restarted node finds its streams);
    ``url=...`` joins that server. Other keywords are NodeConfig settings (``model=`` runs
    another GGUF).
    """
    from node.app import Node
    from node.config import NodeConfig

    nodes: list[Node] = []
    servers: list[EmbeddedNats] = []
    counter = itertools.count()

    async def make(*, fresh_server: bool = False, url: str | None = None, **settings: Any) -> Node:
        n = next(counter)
        if fresh_server:
            server = EmbeddedNats(tmp_path / f"nats-{n}")
            servers.append(server)
            await server.start()
            url = server.url
        settings.setdefault("threads", 1)
        settings.setdefault("model", tiny_model)
        # Node tests exercise the wiring on the engine that needs no compiler; each engine
        # runs a node in tests/test_engines.py.
        settings.setdefault("engine", "ctransformers")
        config = NodeConfig(
            nats_url=url or nats_server.url,
            data_dir=tmp_path / f"node-{n}",
            **settings,
        )
        node = Node(config)
        nodes.append(node)
        await node.start()
        return node

    yield make
    for node in reversed(nodes):
        await node.stop()
    for server in servers:
        await server.stop()
