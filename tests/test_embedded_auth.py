"""The embedded nats-server admits only users holding the passwords made at its first start.

- ``infernode up`` without ``--nats-url`` writes ``<data-dir>/nats-auth.json`` (mode 0600)
  once and keeps it; a connection without those credentials is refused.
- The client library (and so the CLI) uses the client user by itself for that server; the
  ``nats`` CLI gets in through the ``nats context`` file the node writes beside it (0600).
- The client user reaches prompts, events and admin subjects, but not the node's internal
  subjects, its record log, its reply inboxes or JetStream's API (no purge of the streams).
- A gateway started on its own beside the node joins as the node's user.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.errors import Error as NatsError

from node.app import Node
from node.client import InfernodeClient
from node.config import NodeConfig
from node.local_auth import AUTH_FILE, CLIENT_USER, CONTEXT_FILE
from schemas.admin import SessionsReply
from schemas.chat import SamplingParams
from schemas.subjects import Subjects
from tests.helpers import openai_base
from tests.support.agents import Agent
from tests.support.bash import run_bash

ROOT = Path(__file__).resolve().parents[1]
S = Subjects()
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
async def embedded_node(
    tiny_model: Path, tmp_path: Path
) -> AsyncIterator[Callable[[], Any]]:
    """Start nodes with their own embedded nats-server in ``tmp_path / ".infernode"`` (the
    data dir that commands run in ``tmp_path`` find without flags)."""
    nodes: list[Node] = []

    async def start() -> Node:
        config = NodeConfig(data_dir=tmp_path / ".infernode", model=tiny_model, threads=1,
                            bank_ram_bytes=0, heartbeat_s=0)
        node = Node(config)
        nodes.append(node)
        await node.start()
        return node

    yield start
    for node in reversed(nodes):
        await node.stop()


def passwords(data_dir: Path) -> dict[str, str]:
    """Each user's generated password, by user name."""
    raw = json.loads((data_dir / AUTH_FILE).read_text())
    return {entry["user"]: entry["password"] for entry in raw.values()}


async def test_embedded_server_refuses_connections_without_the_generated_credentials(
    embedded_node, tmp_path
):
    """A local process with no credentials, or a wrong password for either user, is refused
    at connect: it can read no records, publish nothing internal and purge no stream."""
    node = await embedded_node()
    with pytest.raises(NatsError, match="Authorization Violation"):
        await nats.connect(node.url, allow_reconnect=False, max_reconnect_attempts=0)
    for user, password in passwords(tmp_path / ".infernode").items():
        with pytest.raises(NatsError, match="Authorization Violation"):
            await nats.connect(node.url, user=user, password=password[::-1],
                               allow_reconnect=False, max_reconnect_attempts=0)


async def test_credentials_are_private_to_the_user_and_kept_across_restarts(
    embedded_node, tmp_path
):
    """nats-auth.json and the nats CLI's context are mode 0600; a restart keeps the
    passwords, and the context names the restarted server's URL."""
    data = tmp_path / ".infernode"
    node = await embedded_node()
    auth, context = data / AUTH_FILE, data / CONTEXT_FILE
    first = auth.read_text()
    for path in (auth, context):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    await node.stop()
    again = await embedded_node()
    assert auth.read_text() == first, "a restart made new credentials"
    assert stat.S_IMODE(auth.stat().st_mode) == 0o600
    body = json.loads(context.read_text())
    # The fields of a `nats context` file (natscontext's settings), for the client user.
    assert body == {"description": body["description"], "url": again.url,
                    "user": CLIENT_USER, "password": passwords(data)[CLIENT_USER]}
    assert stat.S_IMODE(context.stat().st_mode) == 0o600


def _user_env() -> dict[str, str]:
    """A user's shell on the node's machine: no INFERNODE_* or NATS_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERNODE_", "NATS_"))}
    return {**env, "PYTHONPATH": str(ROOT)}


async def test_client_library_and_cli_use_the_generated_credentials_by_themselves(
    embedded_node, tmp_path
):
    """InfernodeClient, `infernode prompt`, `sessions` and `health` connect with no
    credentials and no flags, in the directory where the node runs."""
    node = await embedded_node()
    data = tmp_path / ".infernode"
    async with InfernodeClient(node.url, config=NodeConfig(data_dir=data)) as client:
        result = await client.ask("auth-1", "hello", sampling=GREEDY, max_tokens=2, timeout=60)
    assert result.generation == 1
    outputs = []
    for command in (["prompt", "auth-cli", "hello", "--max-tokens", "2"], ["sessions"],
                    ["health"]):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "node.cli", *command], cwd=tmp_path,
            env=_user_env(), capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, (command, done.stderr)
        outputs.append(done.stdout)
    assert "generation 1" in outputs[0]
    assert "auth-1" in outputs[1] and "auth-cli" in outputs[1]


@pytest.mark.parametrize(("what", "subject"), [
    ("publish", "infer.internal.admit.s-1"),
    ("publish", "infer.records.s-1"),
    ("publish", "infer.events.s-1.commit"),
    ("publish", "_INBOX.infernode.forged"),
    ("publish", "$JS.API.STREAM.PURGE.INFER_RECORDS"),
    ("subscription", "infer.internal.>"),
    ("subscription", "infer.records.>"),
    ("subscription", "_INBOX.infernode.>"),
    ("subscription", "$JS.API.>"),
])
async def test_client_user_is_refused_the_nodes_internal_subjects(
    embedded_node, tmp_path, what, subject
):
    """The client user may not touch internal, record, inbox or JetStream API subjects."""
    node = await embedded_node()
    password = passwords(tmp_path / ".infernode")[CLIENT_USER]
    agent = await Agent.connect(node.url, CLIENT_USER, password)
    try:
        await agent.attempt(what, subject)
    finally:
        await agent.nc.close()


async def test_client_user_listening_to_everything_sees_no_internal_traffic(
    embedded_node, tmp_path
):
    """A '>' subscription of the client user gets events of a turn but no internal message."""
    node = await embedded_node()
    data = tmp_path / ".infernode"
    agent = await Agent.connect(node.url, CLIENT_USER, passwords(data)[CLIENT_USER])
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


async def test_the_nats_cli_gets_in_only_with_the_context_the_node_writes(
    embedded_node, tmp_path, monkeypatch
):
    """`nats req` (tests/nats_cli.py, the real CLI's flags and context files) is refused by
    the embedded server; with the node's context linked in, as the README does, it lists the
    sessions."""
    node = await embedded_node()
    config_home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    monkeypatch.delenv("NATS_CONTEXT", raising=False)
    line = "nats req infer.admin.sessions '{}'"
    code, out, err = await run_bash(line, node.url, tmp_path)
    assert code != 0 and "authorization violation" in (out + err).lower(), (out, err)
    contexts = config_home / "nats" / "context"
    contexts.mkdir(parents=True)
    (contexts / "infernode.json").symlink_to(tmp_path / ".infernode" / CONTEXT_FILE)
    code, out, err = await run_bash(f"nats --context infernode {line[5:]}", node.url, tmp_path)
    assert code == 0, (out, err)
    SessionsReply.model_validate_json(out)


async def test_a_gateway_started_on_its_own_joins_the_embedded_server_as_the_node(
    embedded_node, tmp_path
):
    """`infernode openai --port 0` in the node's directory answers a chat completion: it
    finds the server and logs in as the node's user (its index lives in JetStream)."""
    await embedded_node()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node.cli", "openai", "--port", "0", cwd=tmp_path,
        env=_user_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        base = await openai_base(proc)
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(f"{base}/chat/completions", json={
                "model": "any", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
