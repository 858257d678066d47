"""Agents on the shipped example NATS configuration (``node/examples/nats-agents.conf``): their
own connections and what the server refused them, the node's user, and the server fixture."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from node.config import NodeConfig
from node.nats_server import EmbeddedNats

EXAMPLE_CONF = Path(__file__).resolve().parents[2] / "node" / "examples" / "nats-agents.conf"
PASSWORDS = {
    "INFERNODE_NODE_PASSWORD": "node-secret",
    "INFERNODE_ADMIN_PASSWORD": "admin-secret",
    "AGENT_A_PASSWORD": "a-secret",
    "AGENT_B_PASSWORD": "b-secret",
}
QUIET = {"bank_ram_bytes": 0}
"""Node settings for tests about connections: no snapshots, so no restore check at start."""


@pytest.fixture
async def servers() -> AsyncIterator[list[EmbeddedNats]]:
    """Servers a test starts itself; all stopped after it (after its nodes)."""
    started: list[EmbeddedNats] = []
    yield started
    for server in started:
        await server.stop()


class Agent:
    """An agent's own connection, its inbox under ``_INBOX.<user>``, and what it was refused."""

    def __init__(self, nc: Client, user: str) -> None:
        self.nc = nc
        self.user = user
        self.violations: list[str] = []
        self._changed = asyncio.Condition()

    @classmethod
    async def connect(cls, url: str, user: str, password: str) -> Agent:
        agent: Agent | None = None

        async def on_error(error: Exception) -> None:
            assert agent is not None
            async with agent._changed:
                agent.violations.append(str(error).lower())
                agent._changed.notify_all()

        nc = await nats.connect(
            url, user=user, password=password, inbox_prefix=f"_INBOX.{user}", error_cb=on_error,
            name=user,
        )
        agent = cls(nc, user)
        return agent

    async def refused(self, what: str, subject: str, timeout: float = 10.0) -> None:
        """Wait until the server answered ``permissions violation for <what> to <subject>``."""
        needle = f'permissions violation for {what} to "{subject.lower()}"'
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: any(needle in v for v in self.violations)),
                    timeout,
                )
            except TimeoutError:
                raise AssertionError(
                    f"{self.user}: no {needle!r} within {timeout:g} s; got {self.violations}"
                ) from None

    async def attempt(self, what: str, subject: str) -> None:
        """Subscribe to or publish on ``subject`` (``what``: subscription or publish), then wait
        until the server refuses it."""
        if what == "subscription":
            await self.nc.subscribe(subject)
        else:
            await self.nc.publish(subject, b"{}")
        await self.nc.flush()
        await self.refused(what, subject)

    def config(self) -> NodeConfig:
        """The client configuration of this agent."""
        return NodeConfig(
            nats_user=self.user, nats_password=PASSWORDS[f"AGENT_{self.user[-1].upper()}_PASSWORD"],
            nats_inbox_prefix=f"_INBOX.{self.user}",
        )


@pytest.fixture
async def agents_server(
    servers: list[EmbeddedNats], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> EmbeddedNats:
    """A nats-server running the shipped example configuration."""
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)
    server = EmbeddedNats(tmp_path / "nats-agents", config_file=EXAMPLE_CONF)
    await server.start()
    servers.append(server)
    return server


NODE_USER = {
    "nats_user": "infernode",
    "nats_password": PASSWORDS["INFERNODE_NODE_PASSWORD"],
    "nats_inbox_prefix": "_INBOX.infernode",
}
