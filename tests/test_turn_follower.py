"""One turn follower (``actors/turn_follower.py``) for the client library and the HTTP doors.

A turn the node cuts and runs again by itself (it stopped or restarted mid-turn) is followed
into its rerun by every reader of a session's events: the client library did, and the
gateway's HTTP doors now do too, so a restart behind the gateway reaches the HTTP client as
one answer instead of a 503.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import httpx
import pytest

from actors.gateway import Gateway, GatewaySettings
from actors.turn_follower import EVENT_MODELS, TurnAborted, TurnFollower
from schemas.messages import AbortedEvent, AcceptedEvent, StartedEvent, TokenEvent
from schemas.subjects import EventKind, Subjects
from tests.fake_engine import FakeNode

S = Subjects()
T = TypeVar("T")
CHAT = {"model": "any", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


@pytest.fixture
async def gateway(nc) -> AsyncIterator[str]:
    """A gateway on this test's server; its chat completions URL."""
    async with Gateway(nc, S, GatewaySettings(port=0, model_name="m")) as running:
        yield f"http://127.0.0.1:{running.port}/v1/chat/completions"


async def across_a_restart(url: str, after: int, request: Callable[[], Awaitable[T]]) -> T:
    """What ``request`` got while the node's first turn was cut by a restart after
    ``after`` tokens: the node stops once the turn is held (the cut turn is recorded aborted,
    its prompt kept), and starts again on the same server."""
    first = FakeNode(url, heartbeat_s=0)
    await first.start()
    nodes = [first]
    try:
        gate = first.fake.hold_any(after=after)
        answer = asyncio.ensure_future(request())
        await gate.wait_reached()
        await first.stop()
        nodes.append(FakeNode(url, heartbeat_s=0))
        await nodes[-1].start()
        return await answer
    finally:
        for node in nodes:
            await node.stop()


async def test_a_turn_the_node_reruns_after_a_restart_reaches_the_http_client_as_one_answer(
    nats_server, gateway: str
):
    """Given a chat completion whose turn is cut by the node's restart after its first
    token, when the restarted node runs the turn again by itself, then the HTTP client gets
    one 200 answer, the rerun's, not a 503."""
    async with httpx.AsyncClient(timeout=60) as http:
        response = await across_a_restart(
            nats_server.url, 1, lambda: http.post(gateway, json=CHAT)
        )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "re: hello"


async def test_a_streamed_turn_cut_before_its_first_token_streams_the_reruns_answer(
    nats_server, gateway: str
):
    """Given a streamed chat completion whose turn is cut by the node's restart before any
    token, when the restarted node runs it again, then the stream is the rerun's answer
    alone, with one finish reason."""
    async with httpx.AsyncClient(timeout=60) as http:

        async def read() -> list[str]:
            async with http.stream("POST", gateway, json={**CHAT, "stream": True}) as r:
                assert r.status_code == 200, await r.aread()
                return [line async for line in r.aiter_lines() if line.startswith("data:")]

        data = await across_a_restart(nats_server.url, 0, read)
    chunks = [json.loads(line[5:]) for line in data if line != "data: [DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert text == "re: hello" and [f for f in finishes if f] == ["stop"]


def test_the_follower_reads_every_event_kind_of_a_turn_and_follows_a_rerun():
    """The one event map holds every kind a turn's follower needs (tool calls included), and
    a rerun's ``started`` after a cut turn's ``aborted`` (shutdown) is followed; a client's
    abort ends the following."""
    assert {EventKind.TOOL_CALL, EventKind.TOKEN, EventKind.PROMPT_PROGRESS} <= set(EVENT_MODELS)
    follower = TurnFollower("key")
    follower.step(AcceptedEvent(session="s", message_ids=("m",), generation=0,
                                idempotency_key="key"))
    follower.step(StartedEvent(session="s", turn_id="t1", parent_ids=("m",), generation=0))
    cut = AbortedEvent(session="s", turn_id="t1", reason="shutdown", generation=0,
                       provisional_id="p1")
    assert follower.step(cut) is cut and follower.turn_id is None
    follower.step(StartedEvent(session="s", turn_id="t2", parent_ids=("m",), generation=0))
    token = TokenEvent(session="s", turn_id="t2", index=0, text="x")
    assert follower.step(token) is token and follower.reruns == 1
    with pytest.raises(TurnAborted):
        follower.step(AbortedEvent(session="s", turn_id="t2", reason="client", generation=0,
                                   provisional_id="p2"))
