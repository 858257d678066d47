"""A relay never lets a sender reach a session it could not publish to itself.

The node performs a relay with its own credentials, so it cannot ask the server whether the
sender could have published there. Instead the target decides: a session accepts relayed
answers only from the sessions it granted (``accept_relays_from``), and only who may publish
to a session can grant. On ``node/examples/nats-agents.conf`` on a real nats-server:

- agent A's answer relayed to agent B's session is refused (``forbidden`` 403, told to A),
  and B's history holds only B's own messages;
- A still relays to its own session once that session granted it;
- relays to invented session ids get ``unknown_session`` and create no session, so they
  cannot use up ``--max-sessions``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from node.client import InfernodeClient
from node.config import NodeConfig
from schemas.chat import SamplingParams
from schemas.subjects import Subjects
from tests.helpers import EventCollector
from tests.support import agents
from tests.support.agents import NODE_USER, PASSWORDS, QUIET, Agent

S = Subjects()
# The example-configuration server and its cleanup, as tests/test_security.py runs them.
servers = agents.servers
agents_server = agents.agents_server
GREEDY = SamplingParams(temperature=0.0)


async def user_texts(url: str, session: str) -> list[str]:
    """The user messages of a session, read by the node's own user."""
    async with InfernodeClient(url, config=NodeConfig(**NODE_USER)) as operator:
        history = await operator.history(session)
    return [r.content or "" for r in history.records if r.kind == "user"]


async def relay_errors(agent: Agent, session: str) -> EventCollector:
    """Error events of one of the agent's own sessions."""
    return await EventCollector.start(agent.nc, S.events(session, "error"))


async def test_relay_to_another_agents_session_is_refused_and_own_sessions_still_relay(
    make_node, agents_server
):
    """A's relay into B's session gets forbidden; A's relay into its own granted session lands."""
    node = await make_node(url=agents_server.url, **NODE_USER, **QUIET)
    a = await Agent.connect(node.url, "agent-a", PASSWORDS["AGENT_A_PASSWORD"])
    b = await Agent.connect(node.url, "agent-b", PASSWORDS["AGENT_B_PASSWORD"])
    try:
        async with InfernodeClient(node.url, config=b.config()) as client_b:
            await client_b.complete("b-1", "b's own question", sampling=GREEDY, max_tokens=3)
        errors = await relay_errors(a, "a-1")
        landed = await EventCollector.start(a.nc, S.events("a-2", "commit"))
        async with InfernodeClient(node.url, config=a.config()) as client_a:
            await client_a.complete(
                "a-1", "pass to b", relay_to="b-1", sampling=GREEDY, max_tokens=3
            )
            (msg,) = await errors.wait_until(lambda ms: len(ms) >= 1, timeout=30)
            refusal = json.loads(msg.data)
            assert (refusal["code"], refusal["status"]) == ("forbidden", 403), refusal
            assert "b-1" in refusal["message"] and "a-1" in refusal["message"]

            await client_a.accept_relays("a-2", ["a-1"])
            mine = await client_a.complete(
                "a-1", "pass to a-2", relay_to="a-2", sampling=GREEDY, max_tokens=3
            )
            await landed.wait_until(lambda ms: len(ms) >= 1, timeout=30)
        assert await user_texts(node.url, "b-1") == ["b's own question"]
        assert await user_texts(node.url, "a-2") == [mine.text]
    finally:
        await a.nc.close()
        await b.nc.close()


async def test_relays_to_invented_session_ids_create_no_session(make_node, agents_server):
    """Relays to ids no session granted get unknown_session; max_sessions is not used up."""
    node = await make_node(url=agents_server.url, max_sessions=3, **NODE_USER, **QUIET)
    a = await Agent.connect(node.url, "agent-a", PASSWORDS["AGENT_A_PASSWORD"])
    try:
        errors = await relay_errors(a, "a-1")
        invented = [f"made-up-{i}" for i in range(4)]
        async with InfernodeClient(node.url, config=a.config()) as client_a:
            for target in invented:
                await client_a.complete(
                    "a-1", "spam", relay_to=target, sampling=GREEDY, max_tokens=2
                )
            await errors.wait_until(lambda ms: len(ms) >= len(invented), timeout=30)
            codes = {json.loads(m.data)["code"] for m in errors.messages}
            assert codes == {"unknown_session"}
            # Only a-1 exists, so two more sessions still fit under max_sessions=3.
            await client_a.complete("a-2", "still room", sampling=GREEDY, max_tokens=2)
        async with InfernodeClient(node.url, config=NodeConfig(**NODE_USER)) as operator:
            sessions = {s.session for s in (await operator.sessions()).sessions}
        assert sessions == {"a-1", "a-2"}
    finally:
        await a.nc.close()


async def test_cli_grants_relays_with_accept_relays_from(make_node, nc):
    """`infernode prompt B "..." --accept-relays-from A` lets A's relayed answer into B."""
    node = await make_node(**QUIET)
    landed = await EventCollector.start(nc, S.events("cli-b", "commit"))
    granted = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "node.cli", "prompt", "cli-b", "hello", "--max-tokens", "2",
         "--accept-relays-from", "cli-a", "--nats-url", node.url],
        capture_output=True, text=True, timeout=120,
    )
    assert granted.returncode == 0, granted.stderr
    await landed.wait_until(lambda ms: len(ms) >= 1, timeout=30)
    async with InfernodeClient(node.url) as client:
        relayed = await client.complete("cli-a", "pass on", relay_to="cli-b", sampling=GREEDY,
                                   max_tokens=3)
    await landed.wait_until(lambda ms: len(ms) >= 2, timeout=30)
    assert (await user_texts(node.url, "cli-b"))[-1] == relayed.text
