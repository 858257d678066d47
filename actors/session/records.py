"""The record log as sessions are rebuilt from it: reading it, replaying it, closing turns.

One reader serves the runner host (every session, at start) and the admin history (one
session). The abort records of a turn are built here only, whether a running turn was
aborted or a turn interrupted by a restart is closed while rebuilding.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from actors.session.state import Pending, SessionState, apply
from schemas.chat import ChatMessage
from schemas.records import RECORD_ADAPTER, AbortRecord, DeleteRecord, ProvisionalRecord, Record
from schemas.subjects import Subjects

READ_TIMEOUT_S = 10.0
"""Longest wait for the next record of a log that says it has more."""

Append = Callable[[str, Record], Awaitable[None]]


def new_id(kind: str) -> str:
    """A record or turn id."""
    return f"{kind}_{uuid.uuid4().hex[:20]}"


def abort_records(
    turn_id: str, parent_ids: tuple[str, ...], text: str, reason: str
) -> tuple[ProvisionalRecord, AbortRecord]:
    """The provisional record of a turn that did not commit, and the abort that closes it."""
    provisional = ProvisionalRecord(
        id=new_id("prov"), turn_id=turn_id, message=ChatMessage(role="assistant", content=text),
        parent_ids=parent_ids, ts=time.time(),
    )
    abort = AbortRecord(
        id=new_id("abort"), turn_id=turn_id, provisional_id=provisional.id, reason=reason,
        ts=time.time(),
    )
    return provisional, abort


async def read_log(
    js: JetStreamContext, subjects: Subjects, session: str | None = None
) -> AsyncIterator[tuple[str, Record]]:
    """``(session, record)`` of one session's log, or of every log, up to its last record now."""
    async for name, _, record in read_log_seq(js, subjects, session):
        yield name, record


async def read_log_seq(
    js: JetStreamContext, subjects: Subjects, session: str | None = None
) -> AsyncIterator[tuple[str, int, Record]]:
    """``(session, stream sequence, record)``, as ``read_log``."""
    subject = subjects.records(session) if session is not None else subjects.records_all()
    try:
        last = await js.get_last_msg(subjects.record_stream, subject)
    except NotFoundError:  # no stream yet, or nothing recorded under the subject
        return
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    prefix = len(subjects.records(""))
    try:
        while True:
            msg = await sub.next_msg(timeout=READ_TIMEOUT_S)
            seq = msg.metadata.sequence.stream
            yield msg.subject[prefix:], seq, RECORD_ADAPTER.validate_json(msg.data)
            if seq >= (last.seq or 0):
                return
    finally:
        await sub.unsubscribe()


@dataclass
class Rebuilt:
    """What the record log says about the node's sessions."""

    states: dict[str, SessionState] = field(default_factory=dict)
    """Live sessions, replayed."""
    deleted: dict[str, float] = field(default_factory=dict)
    """Deleted sessions and when, oldest first."""
    last_seq: dict[str, int] = field(default_factory=dict)
    """Stream sequence of each session's last record (live or deleted): the next append
    expects it (``Nats-Expected-Last-Subject-Sequence``)."""


async def rebuild(
    js: JetStreamContext, subjects: Subjects, wanted: Callable[[str], bool] = lambda _: True
) -> Rebuilt:
    """Replay the ``wanted`` sessions' logs (a delete record ends a session; a later record
    revives it)."""
    out = Rebuilt()
    async for session, seq, record in read_log_seq(js, subjects):
        if not wanted(session):
            continue
        out.last_seq[session] = seq
        if isinstance(record, DeleteRecord):
            out.states.pop(session, None)
            out.deleted.pop(session, None)
            out.deleted[session] = record.ts
            continue
        out.deleted.pop(session, None)
        apply(out.states.setdefault(session, SessionState(session)), record)
    return out


async def close_interrupted(
    append: Append, state: SessionState
) -> tuple[ProvisionalRecord, AbortRecord, list[Pending]]:
    """Record the turn a restart interrupted as aborted: ``node_restart``, or ``CRASHED``
    once its input was cut ``CRASH_LIMIT`` times; the records and the turn's input."""
    turn = state.open_turn
    assert turn is not None
    taken = list(state.open_taken)
    provisional, abort = abort_records(turn.id, turn.parent_ids, "", state.interrupted_reason())
    for record in (provisional, abort):
        await append(state.session, record)
        apply(state, record)
    return provisional, abort, taken
