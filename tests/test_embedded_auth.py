"""The embedded nats-server admits only users holding the passwords made at its first start.

- ``infernode up`` without ``--nats-url`` writes ``<data-dir>/nats-auth.json`` (mode 0600)
  once and keeps it; a connection without those credentials is refused.
- The client library (and so the CLI) uses the client user by itself for that server.
- The client user reaches prompts, events and admin subjects, but not the node's internal
  subjects, its record log, its reply inboxes or JetStream's API (no purge of the streams).
"""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.errors import Error as NatsError

from node.app import Node
from node.client import InfernodeClient
from node.config import NodeConfig
from node.local_auth import AUTH_FILE, CLIENT_USER
from schemas.chat import SamplingParams
from schemas.subjects import Subjects
from tests.test_security import Agent

S = Subjects()
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
async def embedded_node(
    tiny_model: Path, tmp_path: Path
) -> AsyncIterator[Callable[[], Any]]:
    """Start nodes with their own embedded nats-server in ``tmp_path / "data"``."""
    nodes: list[Node] = []

    async def start() -> Node:
        config = NodeConfig(data_dir=tmp_path / "data", model=tiny_model, threads=1,
                            bank_ram_bytes=0, heartbeat_s=0)
        node = Node(config)
        nodes.append(node)
        await node.start()
        return node

    yield start
    for node in reversed(nodes):
        await node.stop()


def client_password(data_dir: Path) -> str:
    return str(json.loads((data_dir / AUTH_FILE).read_text())["client"]["password"])


async def test_embedded_server_refuses_connections_without_the_generated_credentials(
    embedded_node, tmp_path
):
    """An anonymous connection to the embedded server is refused; the file is 0600 and kept."""
    node = await embedded_node()
    auth = tmp_path / "data" / AUTH_FILE
    assert stat.S_IMODE(auth.stat().st_mode) == 0o600
    with pytest.raises(NatsError, match="Authorization Violation"):
        await nats.connect(node.url, allow_reconnect=False, max_reconnect_attempts=0)
    first = auth.read_text()
    await node.stop()
    await embedded_node()
    assert auth.read_text() == first, "a restart made new credentials"


async def test_client_library_and_cli_use_the_generated_credentials_by_themselves(
    embedded_node, tmp_path
):
    """InfernodeClient and `infernode health` connect with no credentials given."""
    node = await embedded_node()
    data = tmp_path / "data"
    async with InfernodeClient(node.url, config=NodeConfig(data_dir=data)) as client:
        result = await client.ask("auth-1", "hello", sampling=GREEDY, max_tokens=2, timeout=60)
    assert result.generation == 1
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "node.cli", "health", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("what", "subject"), [
    ("publish", "infer.internal.admit.s-1"),
    ("publish", "infer.records.s-1"),
    ("publish", "infer.events.s-1.commit"),
    ("publish", "_INBOX.infernode.forged"),
    ("publish", "$JS.API.STREAM.PURGE.INFER_RECORDS"),
    ("subscription", "infer.internal.>"),
    ("subscription", "_INBOX.infernode.>"),
])
async def test_client_user_is_refused_the_nodes_internal_subjects(
    embedded_node, tmp_path, what, subject
):
    """The client user may not touch internal, record, inbox or JetStream API subjects."""
    node = await embedded_node()
    agent = await Agent.connect(node.url, CLIENT_USER, client_password(tmp_path / "data"))
    try:
        if what == "subscription":
            await agent.nc.subscribe(subject)
        else:
            await agent.nc.publish(subject, b"{}")
        await agent.nc.flush()
        await agent.refused(what, subject)
    finally:
        await agent.nc.close()


async def test_client_user_listening_to_everything_sees_no_internal_traffic(
    embedded_node, tmp_path
):
    """A '>' subscription of the client user gets events of a turn but no internal message."""
    node = await embedded_node()
    data = tmp_path / "data"
    agent = await Agent.connect(node.url, CLIENT_USER, client_password(data))
    try:
        seen: list[str] = []

        async def on_msg(msg: Any) -> None:
            seen.append(msg.subject)

        await agent.nc.subscribe(">", cb=on_msg)
        await agent.nc.flush()
        async with InfernodeClient(node.url, config=NodeConfig(data_dir=data)) as client:
            await client.ask("auth-2", "hello", sampling=GREEDY, max_tokens=2, timeout=60)
        await agent.nc.flush()
        assert any(s.startswith("infer.events.auth-2.") for s in seen)
        leaked = [s for s in seen if s.startswith(("infer.internal.", "infer.records.",
                                                   "_INBOX.infernode."))]
        assert leaked == []
    finally:
        await agent.nc.close()
