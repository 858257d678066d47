"""Appends to a session's record log whose answer is lost are stored exactly once.

A JetStream publish can time out (or find no responders, or lose its connection) after the
server stored the record. The runner must not then write the same prompt again under a new
id: on a 3-server cluster whose stream leader died, that showed as one prompt recorded twice.
These tests lose the answer on the client side of a real nats-server, after and before the
record reached the stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NoStreamResponseError

from actors.leases import PartitionLeases
from actors.session.appender import APPEND_TRIES, RecordAppender
from actors.session.records import read_log
from node.streams import ensure_streams
from schemas.chat import ChatMessage
from schemas.errors import InferError
from schemas.records import Record, UserRecord
from schemas.subjects import Subjects

S = Subjects()
SESSION = "lossy"


def user_record(text: str) -> UserRecord:
    return UserRecord(id=f"msg_{text}", message=ChatMessage(role="user", content=text),
                      ts=time.time())


@pytest.fixture
async def io(nc: Client) -> AsyncIterator[RecordAppender]:
    """The runners' record appender, holding every partition's lease on a real server."""
    await ensure_streams(nc.jetstream(), S, 1 << 20, partitions=4)
    leases = PartitionLeases(nc, S, "node-a", 4, 30.0, 1, balance=False)
    await leases.start()
    yield RecordAppender(nc.jetstream(), S, leases)
    await leases.stop()


def losing_answers(io: RecordAppender, lose: int, stored: bool) -> list[str]:
    """Make the next ``lose`` publishes lose their answer: the first after the record reached
    the stream when ``stored`` (a timeout), the others before (no responders); the ids of
    the records sent, in order."""
    real: Callable[..., Awaitable[Any]] = io.js.publish
    sent: list[str] = []

    async def publish(subject: str, payload: bytes, **kw: Any) -> Any:
        nonlocal lose, stored
        sent.append(kw["headers"]["Nats-Msg-Id"])
        if lose and not stored:
            lose -= 1
            raise NoStreamResponseError
        ack = await real(subject, payload, **kw)
        if lose:
            lose, stored = lose - 1, False
            raise NatsTimeoutError
        return ack

    io.js.publish = publish  # type: ignore[method-assign]
    return sent


async def log_of(nc: Client) -> list[Record]:
    return [r async for _, r in read_log(nc.jetstream(), S, SESSION)]


async def test_an_append_stored_whose_answer_was_lost_returns_and_is_in_the_log_once(
    nc: Client, io: RecordAppender
):
    """Given a record the stream stored but whose answer was lost twice, append returns as
    stored (the retry is refused as stale and the log's last record is this one), and the
    next record follows it: the log holds each exactly once."""
    await io.append(SESSION, user_record("first"))
    sent = losing_answers(io, lose=2, stored=True)
    await io.append(SESSION, user_record("second"))
    await io.append(SESSION, user_record("third"))
    assert [r.id for r in await log_of(nc)] == ["msg_first", "msg_second", "msg_third"]
    assert sent[:3] == ["msg_second"] * 3  # the same record asked again, never a copy


async def test_an_append_not_stored_whose_answer_was_lost_is_sent_again_and_stored_once(
    nc: Client, io: RecordAppender
):
    """Given publishes that find no responders (nothing stored), append sends the same
    record again until it is stored, once."""
    sent = losing_answers(io, lose=2, stored=False)
    await io.append(SESSION, user_record("only"))
    assert [r.id for r in await log_of(nc)] == ["msg_only"]
    assert sent == ["msg_only"] * 3
    assert len(sent) <= APPEND_TRIES


async def test_a_record_stored_whose_answers_never_came_is_not_recorded_twice(
    nc: Client, io: RecordAppender
):
    """Given a record the stream stored but whose every answer was lost, append gives up with
    the error (the caller defers its prompt); the session's next append, a new record for
    the same prompt, finds the log ahead of what the node knows and gives the partition up,
    so the session is rebuilt from the log instead of holding the prompt twice."""
    await io.append(SESSION, user_record("known"))
    losing_answers(io, lose=APPEND_TRIES, stored=True)
    with pytest.raises(NoStreamResponseError):
        await io.append(SESSION, user_record("lost"))
    with pytest.raises(InferError, match="did not know was stored"):
        await io.append(SESSION, user_record("again"))
    assert not io.ownership.owns(SESSION)
    assert [r.id for r in await log_of(nc)] == ["msg_known", "msg_lost"]
