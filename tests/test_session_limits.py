"""What one session may hold and claim: bytes waiting, bytes recorded, a history that must
travel to the engine, concurrent writers expecting one generation, and the memory its
redelivery and idempotency bookkeeping keeps over many turns.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.aio.client import Client

from actors.session.state import SEEN_PER_SESSION, SessionState
from node.nats_server import EmbeddedNats
from schemas.chat import ChatMessage
from schemas.records import UserRecord
from tests.fake_engine import FakeNode
from tests.support.sessions import Session, records, send

KIB = 1 << 10


def note(n_bytes: int) -> str:
    """A note of about ``n_bytes`` bytes of text."""
    return "x" * n_bytes


# -- 5. bounded appends -------------------------------------------------------------------
async def test_reply_false_appends_past_the_session_byte_bound_get_too_large_413(
    nats_server, nc: Client
):
    """Given a 64 KiB bound on what a session records, when 10 KiB ``reply: false`` appends
    keep coming, then those past the bound get too_large (413) with a sentence naming the
    bound, the record log stops growing, and other sessions are served."""
    async with FakeNode(nats_server.url, heartbeat_s=0, max_session_bytes=64 * KIB):
        watch = await Session.watch(nc, "full")
        keys = [await send(nc, "full", note(10 * KIB), reply=False) for _ in range(10)]
        await watch.until(lambda s: len(s.of("accepted")) + len(s.of("error")) == 10)
        errors = watch.of("error")
        assert 3 <= len(errors) <= 5 and len(watch.of("accepted")) == 10 - len(errors)
        assert {e["code"] for e in errors} == {"too_large"}
        assert {e["status"] for e in errors} == {413}
        assert "65536" in errors[0]["message"] and "new session" in errors[0]["message"]
        assert errors[0]["idempotency_key"] == keys[10 - len(errors)]
        stored = sum(len(r.message.content or "") for r in await records(nc, "full")
                     if isinstance(r, UserRecord))
        assert stored <= 64 * KIB
        other = await Session.watch(nc, "other")
        await send(nc, "other", "still served")
        await other.commits(1)


async def test_appends_waiting_past_the_pending_byte_bound_get_busy(nats_server, nc: Client):
    """Given a turn running and a 32 KiB bound on bytes waiting, when 10 KiB appends arrive,
    then those past the bound get busy (429) naming the bytes waiting; once the turn ends
    the session takes appends again."""
    async with FakeNode(nats_server.url, heartbeat_s=0, max_pending_bytes=32 * KIB) as node:
        watch = await Session.watch(nc, "wait")
        gate = node.fake.hold("wait", after=1)
        await send(nc, "wait", "a long turn")
        await gate.wait_reached()
        for _ in range(5):
            await send(nc, "wait", note(10 * KIB), reply=False)
        await watch.until(lambda s: len(s.of("accepted")) + len(s.of("error")) == 6)
        errors = watch.of("error")
        assert [e["code"] for e in errors] == ["busy", "busy"]
        assert errors[0]["status"] == 429 and "waiting" in errors[0]["message"]
        gate.release()
        await watch.commits(1)
        await watch.idle()
        await watch.accepted(await send(nc, "wait", note(10 * KIB), reply=False))


# -- 6. a history larger than one NATS message -------------------------------------------
@pytest.fixture
async def small_server(tmp_path: Path):
    """A nats-server whose messages carry at most 64 KiB."""
    async with EmbeddedNats(tmp_path / "nats-small", max_payload=64 * KIB) as server:
        yield server


async def test_a_history_larger_than_the_nats_max_payload_fails_too_large_not_unavailable(
    small_server: EmbeddedNats,
):
    """Given a history of 80 KiB on a server that carries 64 KiB, when a turn starts, then it
    fails too_large (413) with a sentence, never 503 MaxPayloadError; the session goes idle
    and the prompt is not retried for ever."""
    import nats

    nc = await nats.connect(small_server.url)
    try:
        async with FakeNode(small_server.url, heartbeat_s=0) as node:
            watch = await Session.watch(nc, "big")
            for _ in range(4):
                await watch.accepted(await send(nc, "big", note(20 * KIB), reply=False))
            await send(nc, "big", "now answer")
            await watch.until(lambda s: bool(s.of("error")) and bool(s.of("aborted")))
            error = watch.of("error")[0]
            assert error["code"] == "too_large" and error["status"] == 413, error
            assert "MaxPayload" not in error["message"] and "max_payload" in error["message"]
            assert (await watch.idle())["pending"] == 0
            assert node.fake.requests == []
            assert watch.of("aborted")[0]["reason"] == "too_large"
    finally:
        await nc.close()


# -- 9. concurrent writers expecting one generation --------------------------------------
async def test_of_ten_concurrent_writers_expecting_one_generation_exactly_one_wins(
    nats_server, nc: Client
):
    """Given a session at generation 1, when 10 writers expecting generation 1 publish at
    once, then exactly one is recorded and answered; nine get conflict (409) and none of
    their text reaches the engine."""
    async with FakeNode(nats_server.url, heartbeat_s=0) as node:
        watch = await Session.watch(nc, "race")
        await send(nc, "race", "first")
        await watch.commits(1)
        keys = await asyncio.gather(*(
            send(nc, "race", f"writer {i}", expect_generation=1) for i in range(10)
        ))
        await watch.until(lambda s: len(s.of("accepted")) - 1 + len(s.of("error")) == 10)
        accepted = [e for e in watch.of("accepted") if e["idempotency_key"] in keys]
        conflicts = watch.of("error")
        assert len(accepted) == 1 and len(conflicts) == 9
        assert {e["code"] for e in conflicts} == {"conflict"}
        assert {e["status"] for e in conflicts} == {409}
        commits = await watch.commits(2)
        assert commits[1]["parent_ids"] == accepted[0]["message_ids"]
        await watch.idle()
        sent = [m.content for r in node.fake.requests for m in r.messages]
        assert sum(1 for t in sent if (t or "").startswith("writer")) == 1


async def test_a_writer_expecting_the_generation_of_a_running_turn_gets_conflict(
    nats_server, nc: Client
):
    """Given a turn running at generation 0, a prompt expecting 0 is refused (409): it could
    not see the answer being written; once the turn commits, a prompt expecting 1 is served."""
    async with FakeNode(nats_server.url, heartbeat_s=0) as node:
        watch = await Session.watch(nc, "run")
        gate = node.fake.hold("run", after=1)
        await send(nc, "run", "first")
        await gate.wait_reached()
        error = await watch.error(await send(nc, "run", "second", expect_generation=0))
        assert error["code"] == "conflict" and error["details"]["generation"] == 0
        gate.release()
        await watch.commits(1)
        await watch.idle()
        await send(nc, "run", "third", expect_generation=1)
        assert (await watch.commits(2))[1]["generation"] == 2


# -- 12. bounded bookkeeping -----------------------------------------------------------------
def test_a_sessions_redelivery_and_idempotency_bookkeeping_stays_bounded_over_many_turns():
    """Given 5,000 recorded prompts, the intake sequences and idempotency keys a session
    remembers stay within their bound, and the most recent ones are still recognised."""
    state = SessionState("long")
    for i in range(5000):
        state.add_user(UserRecord(
            id=f"msg_{i}", message=ChatMessage(role="user", content="hi"), intake_seq=i + 1,
            idempotency_key=f"key-{i}", ts=0.0,
        ))
        state.take_pending()
    assert len(state.intake_seqs) <= SEEN_PER_SESSION
    assert len(state.keys) <= SEEN_PER_SESSION
    assert state.intake_seqs[5000] == ("msg_4999",) and state.keys["key-4999"] == ("msg_4999",)
