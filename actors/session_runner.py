"""One runner per session: an actor whose mailbox serialises admits, turn ends and aborts.

Invariants (DESIGN.md §4) hold by construction: a prompt is acked only after its records are
in the log; "anything pending?" and "go idle" are one mailbox step (``_after_turn``); one
turn at a time, later prompts coalesced into the next; the generation advances only on a
commit; an abort leaves a provisional record and no commit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog

from actors.session_state import RETRIED_REASONS, Pending, SessionState
from schemas.chat import ChatMessage
from schemas.errors import ErrorCode, InferError
from schemas.internal import AdmitReply, AdmitRequest, ErrorBody, GenerateRequest, GenerateResult
from schemas.messages import (
    AbortedEvent,
    AbortReply,
    AcceptedEvent,
    CommitEvent,
    DoneEvent,
    ErrorEvent,
    ProvisionalEvent,
    StartedEvent,
    StatusEvent,
)
from schemas.records import (
    AbortRecord,
    AssistantRecord,
    CommitRecord,
    ProvisionalRecord,
    Record,
    TurnParams,
    TurnStartRecord,
    UserRecord,
)
from schemas.subjects import EventKind

if TYPE_CHECKING:
    from pydantic import BaseModel

log = structlog.get_logger("session_runner")


def new_id(kind: str) -> str:
    """A record or turn id."""
    return f"{kind}_{uuid.uuid4().hex[:20]}"


class RunnerIO(Protocol):
    """What a runner needs from its host: the bus, nothing else."""

    max_pending: int

    async def append(self, session: str, record: Record) -> None: ...
    async def event(
        self, session: str, kind: EventKind, model: BaseModel, aborted: bool = False
    ) -> None: ...
    async def generate(self, req: GenerateRequest) -> GenerateResult: ...
    async def cancel_engine(self, session: str, turn_id: str) -> None: ...
    async def bank_commit(self, session: str, turn_id: str, generation: int, result: GenerateResult) -> None: ...
    async def relay(self, target: str, source: str, text: str) -> None: ...
    def token_subject(self, session: str) -> str: ...
    async def deleted(self, session: str) -> None: ...


@dataclass
class Turn:
    """A running turn."""

    id: str
    taken: list[Pending]
    parent_ids: tuple[str, ...]
    params: TurnParams
    started: float
    abort_waiters: list[asyncio.Future[AbortReply]] = field(default_factory=list)
    abort_reason: str = "client"


@dataclass
class _Admit:
    req: AdmitRequest
    done: asyncio.Future[AdmitReply]


@dataclass
class _TurnDone:
    turn: Turn
    result: GenerateResult


@dataclass
class _Abort:
    reason: str
    done: asyncio.Future[AbortReply]


@dataclass
class _Delete:
    done: asyncio.Future[None]


@dataclass
class _Resume:
    pass


_Command = _Admit | _TurnDone | _Abort | _Delete | _Resume


class SessionRunner:
    """The actor of one session."""

    def __init__(self, io: RunnerIO, state: SessionState) -> None:
        self.io = io
        self.state = state
        self.session = state.session
        self.mailbox: asyncio.Queue[_Command] = asyncio.Queue()
        self.turn: Turn | None = None
        self.deleting: asyncio.Future[None] | None = None
        self.closed = False
        self.stopping = False
        self.log = log.bind(actor="session_runner", session=self.session)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"runner:{self.session}")
        self._turn_task: asyncio.Task[None] | None = None
        self.idle = asyncio.Event()
        self.idle.set()

    # -- mailbox ---------------------------------------------------------------------------
    async def admit(self, req: AdmitRequest) -> AdmitReply:
        """Record a prompt; resolves once it is in the log (or refused)."""
        done: asyncio.Future[AdmitReply] = asyncio.get_running_loop().create_future()
        self.mailbox.put_nowait(_Admit(req, done))
        return await done

    async def abort(self, reason: str) -> AbortReply:
        """Abort the running turn; resolves once its abort is recorded."""
        done: asyncio.Future[AbortReply] = asyncio.get_running_loop().create_future()
        self.mailbox.put_nowait(_Abort(reason, done))
        return await done

    async def delete(self) -> None:
        """Delete the session once an in-flight turn has ended and its commit is written."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.mailbox.put_nowait(_Delete(done))
        await done

    def resume(self) -> None:
        """Answer what a rebuilt state has pending."""
        self.mailbox.put_nowait(_Resume())

    async def _run(self) -> None:
        while not self.closed:
            cmd = await self.mailbox.get()
            try:
                await self._handle(cmd)
            except Exception as e:  # one bad command must not stop the session
                self.log.exception("runner_command_failed", error=str(e))
                self._fail_command(cmd, e)
                if isinstance(cmd, _TurnDone):
                    await self._after_turn()

    async def _handle(self, cmd: _Command) -> None:
        if isinstance(cmd, _Admit):
            await self.on_admit(cmd)
        elif isinstance(cmd, _TurnDone):
            await self.on_turn_done(cmd.turn, cmd.result)
        elif isinstance(cmd, _Abort):
            await self.on_abort(cmd)
        elif isinstance(cmd, _Delete):
            await self.on_delete(cmd.done)
        else:
            await self._after_turn()

    def _fail_command(self, cmd: _Command, e: Exception) -> None:
        fut = getattr(cmd, "done", None)
        if fut is not None and not fut.done():
            err = e if isinstance(e, InferError) else InferError(ErrorCode.INTERNAL, str(e))
            if isinstance(cmd, _Admit):
                fut.set_result(_rejected(err))
            else:
                fut.set_exception(err)

    # -- admits ----------------------------------------------------------------------------
    async def on_admit(self, cmd: _Admit) -> None:
        """Record the prompt's messages, answer admission, maybe start a turn."""
        req, st = cmd.req, self.state
        prompt, key = req.prompt, req.idempotency_key
        if self.deleting is not None:
            cmd.done.set_result(_rejected(InferError(ErrorCode.GONE, f"session {self.session} is being deleted")))
            return
        if (req.intake_seq is not None and req.intake_seq in st.intake_seqs) or (key and key in st.keys):
            ids = st.keys.get(key or "", ())
            cmd.done.set_result(AdmitReply(outcome="duplicate", message_ids=ids, generation=st.generation))
            return
        if prompt.expect_generation is not None and prompt.expect_generation != st.generation:
            cmd.done.set_result(_rejected(InferError(
                ErrorCode.CONFLICT,
                f"session {self.session} is at generation {st.generation}, not "
                f"{prompt.expect_generation}; nothing was recorded",
                {"generation": st.generation, "expected": prompt.expect_generation},
            )))
            return
        if len(st.pending) + len(prompt.messages) > self.io.max_pending:
            cmd.done.set_result(_rejected(InferError(
                ErrorCode.BUSY,
                f"session {self.session} already has {len(st.pending)} prompts waiting; "
                "retry after its current turn",
                {"pending": len(st.pending)},
            )))
            return
        if not prompt.messages and not (prompt.reply and st.pending):
            cmd.done.set_result(_rejected(InferError(
                ErrorCode.BAD_REQUEST,
                "the prompt has no messages and nothing is pending to answer; send at least "
                "one message",
            )))
            return
        params = TurnParams(
            sampling=prompt.sampling, stop=prompt.stop, max_tokens=prompt.max_tokens,
            relay_to=prompt.relay_to,
        )
        ids = []
        for m in prompt.messages:
            record = UserRecord(
                id=new_id("msg"), message=m, intake_seq=req.intake_seq, idempotency_key=key,
                reply=prompt.reply, params=params, ts=time.time(),
            )
            await self.io.append(self.session, record)
            st.add_user(record)
            ids.append(record.id)
        if prompt.reply:
            st.retry_deferred()
        reply = AdmitReply(outcome="recorded", message_ids=tuple(ids), generation=st.generation)
        cmd.done.set_result(reply)
        await self.io.event(self.session, EventKind.ACCEPTED, AcceptedEvent(
            session=self.session, message_ids=tuple(ids), generation=st.generation,
            idempotency_key=key,
        ))
        if self.turn is None:
            await self._after_turn()

    # -- turns -----------------------------------------------------------------------------
    async def _after_turn(self) -> None:
        """The one step that either starts the next turn or goes idle: no lost wake-up."""
        if self.deleting is not None:
            await self._finish_delete()
            return
        if self.stopping:
            await self._status("idle")
            self.idle.set()
            return
        if self.state.wants_turn():
            await self._start_turn()
            return
        self.state.fold_unanswered_appends()
        await self._status("idle")
        self.idle.set()

    async def _start_turn(self) -> None:
        st = self.state
        taken = st.take_pending()
        parents = tuple(p.record.id for p in taken if p.record.reply)
        params = next((p.record.params for p in reversed(taken) if p.record.reply), TurnParams())
        turn = Turn(new_id("turn"), taken, parents, params, time.time())
        self.turn = turn
        self.idle.clear()
        await self.io.append(self.session, TurnStartRecord(
            id=turn.id, parent_ids=parents, input_ids=tuple(p.record.id for p in taken),
            ts=time.time(),
        ))
        await self._status("busy")
        await self.io.event(self.session, EventKind.STARTED, StartedEvent(
            session=self.session, turn_id=turn.id, parent_ids=parents, generation=st.generation,
        ))
        messages, tokens, model_id = st.messages_for(taken)
        queued_at = min(p.record.ts for p in taken)
        self.log.info("chat_start", turn=turn.id, messages=len(messages), parents=len(parents),
                      queue_ms=round((time.time() - queued_at) * 1000, 2))
        req = GenerateRequest(
            session=self.session, turn_id=turn.id, messages=messages, assistant_tokens=tokens,
            model_id=model_id, sampling=params.sampling, stop=params.stop,
            max_tokens=params.max_tokens, token_subject=self.io.token_subject(self.session),
            queued_at=queued_at,
        )
        self._turn_task = asyncio.get_running_loop().create_task(self._generate(turn, req))

    async def _generate(self, turn: Turn, req: GenerateRequest) -> None:
        try:
            result = await self.io.generate(req)
        except InferError as e:
            result = _failed(req, e)
        except Exception as e:
            result = _failed(req, InferError(ErrorCode.INTERNAL, f"the turn failed: {e}"))
        self.mailbox.put_nowait(_TurnDone(turn, result))

    async def on_turn_done(self, turn: Turn, r: GenerateResult) -> None:
        """Commit, or record the honest provisional of an aborted or failed turn."""
        self.turn = None
        try:
            if r.error is not None:
                await self._record_failure(turn, r)
            elif r.finish_reason == "aborted":
                await self._record_abort(turn, r.raw_text, turn.abort_reason)
            else:
                await self._commit(turn, r)
        finally:
            aborted = r.finish_reason in ("aborted", "error")
            for fut in turn.abort_waiters:
                if not fut.done():
                    fut.set_result(AbortReply(session=self.session, aborted=aborted, turn_id=turn.id))
        await self._after_turn()

    async def _commit(self, turn: Turn, r: GenerateResult) -> None:
        st = self.state
        await self.io.event(self.session, EventKind.DONE, DoneEvent(
            session=self.session, turn_id=turn.id, parent_ids=turn.parent_ids, text=r.text,
            tool_calls=r.tool_calls, finish_reason=r.finish_reason, usage=r.usage, cache=r.cache,
            timings=r.timings,
        ))
        message = ChatMessage(role="assistant", content=r.text, tool_calls=r.tool_calls or None)
        assistant = AssistantRecord(
            id=new_id("msg"), turn_id=turn.id, message=message, parent_ids=turn.parent_ids,
            finish_reason=r.finish_reason, token_ids=r.completion_ids, model_id=r.model_id or None,
            ts=time.time(),
        )
        commit = CommitRecord(
            id=new_id("commit"), turn_id=turn.id, assistant_id=assistant.id,
            generation=st.generation + 1, parent_ids=turn.parent_ids,
            supersedes=st.superseded_by_next, ts=time.time(),
        )
        await self.io.append(self.session, assistant)
        await self.io.append(self.session, commit)
        st.commit(turn.taken, assistant, commit)
        await self.io.event(self.session, EventKind.COMMIT, CommitEvent(
            session=self.session, turn_id=turn.id, generation=commit.generation,
            record_id=assistant.id, parent_ids=turn.parent_ids, supersedes=commit.supersedes,
        ))
        t, u = r.timings, r.usage
        self.log.info(
            "chat_done", turn=turn.id, generation=commit.generation, finish=r.finish_reason,
            queue_ms=round(t.queue_ms, 2), lock_wait_ms=round(t.lock_wait_ms, 2),
            tokenize_ms=round(t.tokenize_ms, 2), restore_ms=round(t.restore_ms, 2),
            prefill_ms=round(t.prefill_ms, 2), decode_ms=round(t.decode_ms, 2),
            ttft_ms=round(t.ttft_ms, 2), total_ms=round(t.total_ms, 2),
            prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens,
            completion_tokens=u.completion_tokens, cache_source=r.cache.source,
            miss_reason=r.cache.miss_reason,
        )
        await self.io.bank_commit(self.session, turn.id, commit.generation, r)
        if turn.params.relay_to and r.text:
            await self.io.relay(turn.params.relay_to, self.session, r.text)

    async def _record_abort(self, turn: Turn, text: str, reason: str) -> None:
        st = self.state
        provisional = ProvisionalRecord(
            id=new_id("prov"), turn_id=turn.id,
            message=ChatMessage(role="assistant", content=text), parent_ids=turn.parent_ids,
            ts=time.time(),
        )
        await self.io.append(self.session, provisional)
        await self.io.append(self.session, AbortRecord(
            id=new_id("abort"), turn_id=turn.id, provisional_id=provisional.id, reason=reason,
            ts=time.time(),
        ))
        drop = reason == "context_overflow"
        st.abort(turn.taken if not drop else [], provisional.id, retry=reason in RETRIED_REASONS)
        await self.io.event(self.session, EventKind.PROVISIONAL, ProvisionalEvent(
            session=self.session, turn_id=turn.id, record_id=provisional.id,
            parent_ids=turn.parent_ids, text=text,
        ), aborted=True)
        await self.io.event(self.session, EventKind.ABORTED, AbortedEvent(
            session=self.session, turn_id=turn.id, reason=reason, generation=st.generation,
            provisional_id=provisional.id,
        ), aborted=True)
        self.log.info("turn_aborted", turn=turn.id, reason=reason, partial_chars=len(text))

    async def _record_failure(self, turn: Turn, r: GenerateResult) -> None:
        err = r.error
        assert err is not None
        await self.io.event(self.session, EventKind.ERROR, ErrorEvent(
            session=self.session, code=err.code, status=InferError(err.code, "").status,
            message=err.message, turn_id=turn.id, details=err.details,
        ))
        reason = err.code.value if err.code == ErrorCode.CONTEXT_OVERFLOW else "engine_error"
        await self._record_abort(turn, r.raw_text or r.text, reason)

    # -- abort / delete --------------------------------------------------------------------
    async def on_abort(self, cmd: _Abort) -> None:
        """Cancel the running turn; the reply waits until its abort is recorded."""
        turn = self.turn
        if turn is None:
            cmd.done.set_result(AbortReply(session=self.session, aborted=False))
            return
        turn.abort_reason = cmd.reason
        turn.abort_waiters.append(cmd.done)
        await self.io.cancel_engine(self.session, turn.id)

    async def on_delete(self, done: asyncio.Future[None]) -> None:
        """Delete now, or after the running turn ends."""
        self.deleting = done
        if self.turn is not None:
            self.turn.abort_reason = "deleted"
            await self.io.cancel_engine(self.session, self.turn.id)
            return
        await self._finish_delete()

    async def _finish_delete(self) -> None:
        done = self.deleting
        self.closed = True
        try:
            await self.io.deleted(self.session)
        except Exception as e:
            if done is not None and not done.done():
                done.set_exception(e)
            raise
        if done is not None and not done.done():
            done.set_result(None)
        self.idle.set()

    async def shutdown(self) -> None:
        """Abort a running turn (it will be retried after a restart) and stop."""
        self.stopping = True
        if self.turn is not None:
            self.turn.abort_reason = "shutdown"
            await self.io.cancel_engine(self.session, self.turn.id)
            await self.idle.wait()
        self.closed = True
        self._task.cancel()

    async def _status(self, state: str) -> None:
        await self.io.event(self.session, EventKind.STATUS, StatusEvent(
            session=self.session, state=state,  # type: ignore[arg-type]
            generation=self.state.generation, pending=len(self.state.pending),
        ))


def _rejected(err: InferError) -> AdmitReply:
    return AdmitReply(
        outcome="rejected", error=ErrorBody(code=err.code, message=err.message, details=err.details)
    )


def _failed(req: GenerateRequest, err: InferError) -> GenerateResult:
    return GenerateResult(
        session=req.session, turn_id=req.turn_id, finish_reason="error",
        error=ErrorBody(code=err.code, message=err.message, details=err.details),
    )
