"""Idempotency is scoped to one session, and a retried publish is answered, not ignored.

- ``Nats-Msg-Id`` is read as the prompt's idempotency key *within its session*: agent B's
  prompt carrying the same header id as agent A's earlier one is recorded, not dropped by a
  stream-wide de-duplication; the client library sets the header from session and key.
- A retried publish (same key, same body) gets ``accepted`` with ``duplicate: true`` naming
  the records of the first; the same key with a different body gets a ``conflict`` (409)
  error event, and nothing is recorded twice.
"""

from __future__ import annotations

import json

from nats.aio.client import Client

from node.client import InfernodeClient
from schemas.chat import ChatMessage
from schemas.messages import PromptRequest
from schemas.subjects import MSG_ID_HEADER, Subjects
from tests.fake_engine import FakeNode
from tests.helpers import EventCollector

S = Subjects()


def nats_url(nc: Client) -> str:
    """The URL of an open connection (the client reuses the connection itself)."""
    assert nc.connected_url is not None
    return nc.connected_url.geturl()


def append(text: str, key: str | None = None) -> bytes:
    """A ``reply: false`` prompt (no turn), optionally with a body idempotency key."""
    prompt = PromptRequest(
        messages=(ChatMessage(role="user", content=text),), reply=False, idempotency_key=key
    )
    return prompt.model_dump_json().encode()


async def user_texts(nc: Client, session: str) -> list[str]:
    """The user messages recorded in a session's log."""
    async with InfernodeClient(nats_url(nc), nc=nc) as client:
        history = await client.history(session)
    return [r.content or "" for r in history.records if r.kind == "user"]


async def test_same_msg_id_header_in_another_session_is_not_dropped(nats_server, nc):
    """B's prompt with the Nats-Msg-Id header A used is stored and recorded in B's session."""
    js = nc.jetstream()
    async with FakeNode(nats_server.url, heartbeat_s=0):
        accepted = await EventCollector.start(nc, S.events("*", "accepted"))
        await js.publish(S.prompt("a-1"), append("from a"), headers={MSG_ID_HEADER: "id-1"})
        # At once: the intake de-duplicates nothing; only the session's own runner judges
        # a retry.
        ack = await js.publish(S.prompt("b-1"), append("from b"), headers={MSG_ID_HEADER: "id-1"})
        assert not ack.duplicate, "the intake stream dropped B's prompt as A's duplicate"
        await accepted.wait_until(lambda ms: len(ms) >= 2)
        events = {m.subject: json.loads(m.data) for m in accepted.messages}
        assert events[S.events("b-1", "accepted")]["duplicate"] is False
        assert await user_texts(nc, "b-1") == ["from b"]


async def test_client_sets_msg_id_header_from_session_and_key(nats_server, nc):
    """The client library's Nats-Msg-Id names the session as well as the key."""
    seen = await EventCollector.start(nc, S.prompt_all())
    async with FakeNode(nats_server.url, heartbeat_s=0), InfernodeClient(
        nats_url(nc), nc=nc
    ) as client:
        key = await client.send("s-1", PromptRequest(
            messages=(ChatMessage(role="user", content="hi"),), idempotency_key="k-1",
            reply=False,
        ))
    (msg,) = await seen.wait_until(lambda ms: len(ms) >= 1)
    assert key == "k-1"
    assert msg.headers is not None
    assert msg.headers[MSG_ID_HEADER] == "s-1:k-1"


async def test_retried_publish_gets_accepted_with_duplicate_true(nats_server, nc):
    """The same key and body twice: one record, and the retry's accepted says duplicate."""
    js = nc.jetstream()
    async with FakeNode(nats_server.url, heartbeat_s=0):
        accepted = await EventCollector.start(nc, S.events("r-1", "accepted"))
        for _ in range(2):
            await js.publish(S.prompt("r-1"), append("once", key="k-1"))
        await accepted.wait_until(lambda ms: len(ms) >= 2)
        first, retry = (json.loads(m.data) for m in accepted.messages)
        assert (first["duplicate"], retry["duplicate"]) == (False, True)
        assert retry["message_ids"] == first["message_ids"]
        assert retry["idempotency_key"] == "k-1"
        assert await user_texts(nc, "r-1") == ["once"]


async def test_same_key_with_a_different_body_gets_a_conflict_event(nats_server, nc):
    """A second prompt reusing a key for other content is refused with 409, not dropped."""
    js = nc.jetstream()
    async with FakeNode(nats_server.url, heartbeat_s=0):
        accepted = await EventCollector.start(nc, S.events("c-1", "accepted"))
        errors = await EventCollector.start(nc, S.events("c-1", "error"))
        await js.publish(S.prompt("c-1"), append("first", key="k-1"))
        await accepted.wait_until(lambda ms: len(ms) >= 1)
        await js.publish(S.prompt("c-1"), append("something else", key="k-1"))
        (msg,) = await errors.wait_until(lambda ms: len(ms) >= 1)
        event = json.loads(msg.data)
        assert (event["code"], event["status"], event["idempotency_key"]) == (
            "conflict", 409, "k-1"
        )
        assert "different" in event["message"]
        assert await user_texts(nc, "c-1") == ["first"]
        assert len(accepted.messages) == 1
