"""How a session runner records the end of a turn: commit, abort, or failure.

These steps run inside the runner's mailbox, one at a time, so the records of a turn are
never interleaved with another command of the same session. The state changes only after
the records that imply it are in the log (``Turn.recorded`` says whether it did).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from actors.session.io import RunnerIO
from actors.session.records import abort_records, new_id
from actors.session.state import CRASH_LIMIT, CRASHED, RETRIED_REASONS, Pending, SessionState
from schemas.chat import ChatMessage, Usage
from schemas.errors import ErrorCode, InferError
from schemas.internal import ErrorBody, GenerateRequest, GenerateResult
from schemas.messages import (
    AbortedEvent,
    AbortReply,
    AnswerReply,
    CommitEvent,
    DoneEvent,
    ErrorEvent,
    ProvisionalEvent,
)
from schemas.records import (
    AbortRecord,
    AssistantRecord,
    CommitRecord,
    ProvisionalRecord,
    TurnParams,
)
from schemas.subjects import EventKind

UNANSWERABLE = frozenset({ErrorCode.CONTEXT_OVERFLOW, ErrorCode.TOO_LARGE})
"""Failures no rerun can fix: the turn's input is dropped (see ``DROPPED_REASONS``)."""


@dataclass
class Turn:
    """A running turn and its clocks (``perf_counter`` seconds)."""

    id: str
    taken: list[Pending]
    parent_ids: tuple[str, ...]
    supersedes: str | None
    params: TurnParams
    queue_ms: float
    """From the oldest answered message's recording to the start of the turn."""
    started: float = field(default_factory=time.perf_counter)
    abort_waiters: list[asyncio.Future[AbortReply]] = field(default_factory=list)
    abort_reason: str = "client"
    recorded: bool = False
    """True once the state took in the turn's end (commit or abort)."""
    commit_records: tuple[AssistantRecord, CommitRecord] | None = None
    abort_records: tuple[ProvisionalRecord, AbortRecord] | None = None
    """The end records, built once: an end recorded again after a failed append writes the
    same record ids, which the log deduplicates (an append whose ack was lost is not a
    second answer)."""


async def record_commit(io: RunnerIO, st: SessionState, turn: Turn, r: GenerateResult) -> int:
    """Publish ``done``, write the assistant and commit records, then ``commit``; new generation."""
    s = st.session
    await io.event(s, EventKind.DONE, DoneEvent(
        session=s, turn_id=turn.id, parent_ids=turn.parent_ids, text=r.text,
        tool_calls=r.tool_calls, finish_reason=r.finish_reason, usage=r.usage, cache=r.cache,
        timings=r.timings, stop_sequence=r.stop_sequence,
    ))
    if turn.commit_records is None:
        message = ChatMessage(role="assistant", content=r.text, tool_calls=r.tool_calls or None)
        built = AssistantRecord(
            id=new_id("msg"), turn_id=turn.id, message=message, parent_ids=turn.parent_ids,
            finish_reason=r.finish_reason, token_ids=r.completion_ids,
            model_id=r.model_id or None, ts=time.time(),
        )
        window = st.record_at(turn.taken, r.window_start) if r.usage.dropped_turns else None
        turn.commit_records = built, CommitRecord(
            id=new_id("commit"), turn_id=turn.id, assistant_id=built.id,
            generation=st.generation + 1, parent_ids=turn.parent_ids,
            supersedes=turn.supersedes, window_from=window, ts=time.time(),
        )
    assistant, commit = turn.commit_records
    await io.append(s, assistant)
    await io.append(s, commit)
    st.commit(turn.taken, assistant, commit)
    turn.recorded = True
    await io.event(s, EventKind.COMMIT, CommitEvent(
        session=s, turn_id=turn.id, generation=commit.generation, record_id=assistant.id,
        parent_ids=turn.parent_ids, supersedes=commit.supersedes,
    ))
    await answer_asks(io, turn, AnswerReply(
        session=s, turn_id=turn.id, parent_ids=turn.parent_ids, text=r.text,
        tool_calls=r.tool_calls, finish_reason=r.finish_reason, usage=r.usage,
        generation=commit.generation, record_id=assistant.id, model_id=r.model_id, cache=r.cache,
        timings=r.timings,
    ))
    # The bank snapshot and the relay come after the commit: neither delays the stream.
    await io.bank_commit(s, turn.id, commit.generation, r)
    if turn.params.relay_to and r.text:
        await io.relay(turn.params.relay_to, s, turn.id, r.text, turn.params)
    return commit.generation


async def record_abort(
    io: RunnerIO, st: SessionState, turn: Turn, text: str, reason: str, answer: bool = True
) -> str:
    """Write the provisional and abort records, publish both events; the provisional's id.

    Asks are answered with the partial text, unless the turn is retried by itself (a node
    stopping or restarting): then the retry answers them.
    """
    s = st.session
    if turn.abort_records is None:
        turn.abort_records = abort_records(turn.id, turn.parent_ids, text, reason)
    provisional, abort = turn.abort_records
    await io.append(s, provisional)
    await io.append(s, abort)
    st.abort(turn.taken, provisional.id, reason)
    turn.recorded = True
    await publish_abort(io, st, provisional, reason, text)
    if answer and reason not in RETRIED_REASONS:
        await answer_asks(io, turn, AnswerReply(
            session=s, turn_id=turn.id, parent_ids=turn.parent_ids, text=text,
            finish_reason="aborted", generation=st.generation, record_id=provisional.id,
            usage=Usage(prompt_tokens=0, cached_tokens=0, new_prefill_tokens=0,
                        completion_tokens=0),
        ))
    return provisional.id


async def publish_abort(
    io: RunnerIO, st: SessionState, provisional: ProvisionalRecord, reason: str, text: str
) -> None:
    """Publish a recorded abort: ``provisional`` with the partial text, then ``aborted``
    (both marked ``Infer-Aborted``), so a client that saw the turn start sees it end."""
    s = st.session
    await io.event(s, EventKind.PROVISIONAL, ProvisionalEvent(
        session=s, turn_id=provisional.turn_id, record_id=provisional.id,
        parent_ids=provisional.parent_ids, text=text,
    ), aborted=True)
    await io.event(s, EventKind.ABORTED, AbortedEvent(
        session=s, turn_id=provisional.turn_id, reason=reason, generation=st.generation,
        provisional_id=provisional.id,
    ), aborted=True)


async def record_failure(io: RunnerIO, st: SessionState, turn: Turn, r: GenerateResult) -> str:
    """Record a failed turn as aborted; the abort reason.

    A turn the bus failed (``unavailable``: the result was lost, no engine answered) is
    run again by the runner, so the agent gets no error, only the cut turn's ``aborted``.
    Any other failure is published as a typed error first.
    """
    err = r.error
    assert err is not None
    if err.code == ErrorCode.UNAVAILABLE:
        # The runner runs the turn again: its asks are answered by that run.
        await record_abort(io, st, turn, r.raw_text or r.text, "unavailable")
        return "unavailable"
    error = InferError(err.code, err.message, err.details)
    event = ErrorEvent(
        session=st.session, code=err.code, status=error.status, message=err.message,
        turn_id=turn.id, details=err.details,
    )
    await io.event(st.session, EventKind.ERROR, event)
    reason = err.code.value if err.code in UNANSWERABLE else "engine_error"
    await record_abort(io, st, turn, r.raw_text or r.text, reason, answer=False)
    await answer_asks(io, turn, event, error)
    return reason


async def publish_set_aside(
    io: RunnerIO, st: SessionState, abort: AbortRecord, taken: list[Pending]
) -> None:
    """Say why a turn whose input a node's death cut ``CRASH_LIMIT`` times is not run again
    (its abort, ``CRASHED``, is recorded): an ``error`` event, and to each ask it answered."""
    error = InferError(
        ErrorCode.INTERNAL,
        f"the node died {CRASH_LIMIT} times while running this turn, so its prompt is set "
        "aside and not run again: send it again to retry",
        {"reason": CRASHED, "cuts": str(CRASH_LIMIT)},
    )
    event = ErrorEvent(
        session=st.session, code=error.code, status=error.status, message=error.message,
        turn_id=abort.turn_id, details=error.details,
    )
    await io.event(st.session, EventKind.ERROR, event)
    for inbox in dict.fromkeys(p.record.params.answer_to for p in taken if p.wants_reply):
        if inbox is not None:
            await io.answer(inbox, event, error)


async def answer_asks(
    io: RunnerIO, turn: Turn, model: BaseModel, error: InferError | None = None
) -> None:
    """Send the turn's outcome to the inbox of every ask it answered (each once)."""
    inboxes = dict.fromkeys(
        p.record.params.answer_to for p in turn.taken
        if p.wants_reply and p.record.params.answer_to
    )
    for inbox in inboxes:
        if inbox is not None:
            await io.answer(inbox, model, error)


def chat_start_fields(turn: Turn, messages: int, generation: int, inflight: int) -> dict[str, Any]:
    """The ``chat_start`` log line of a turn."""
    return {
        "turn": turn.id, "messages": messages, "parents": len(turn.parent_ids),
        "generation": generation, "queue_ms": round(turn.queue_ms, 2), "inflight_now": inflight,
        "retry_of": turn.supersedes,
    }


def chat_done_fields(
    turn: Turn, r: GenerateResult, outcome: str, generation: int, inflight: int
) -> dict[str, Any]:
    """The ``chat_done`` log line: the engine's buckets and the node's own time.

    ``turn_ms`` runs from the turn's start to its last record and event; ``overhead_ms`` is
    what of it the engine did not spend (runner, records, bus), so
    ``overhead_ms / total_ms`` is the node's overhead per unit of engine time.
    """
    t, u = r.timings, r.usage
    turn_ms = (time.perf_counter() - turn.started) * 1000
    engine_ms = t.lock_wait_ms + t.total_ms
    return {
        "turn": turn.id, "outcome": outcome, "finish": r.finish_reason, "generation": generation,
        "queue_ms": round(turn.queue_ms, 2), "lock_wait_ms": round(t.lock_wait_ms, 2),
        "tokenize_ms": round(t.tokenize_ms, 2), "restore_ms": round(t.restore_ms, 2),
        "prefill_ms": round(t.prefill_ms, 2), "decode_ms": round(t.decode_ms, 2),
        "ttft_ms": round(t.ttft_ms, 2), "total_ms": round(t.total_ms, 2),
        "turn_ms": round(turn_ms, 2), "overhead_ms": round(max(0.0, turn_ms - engine_ms), 2),
        "inflight_now": inflight, "prompt_tokens": u.prompt_tokens,
        "cached_tokens": u.cached_tokens, "new_prefill_tokens": u.new_prefill_tokens,
        "completion_tokens": u.completion_tokens, "cache_source": r.cache.source,
        "miss_reason": r.cache.miss_reason,
    }


def failed_result(req: GenerateRequest, err: InferError) -> GenerateResult:
    """The result of a turn the engine could not run."""
    return GenerateResult(
        session=req.session, turn_id=req.turn_id, finish_reason="error",
        error=ErrorBody(code=err.code, message=err.message, details=err.details),
    )


def aborted_result(req: GenerateRequest) -> GenerateResult:
    """The result of a turn whose engine request was given up (the node is stopping)."""
    return GenerateResult(session=req.session, turn_id=req.turn_id, finish_reason="aborted")
