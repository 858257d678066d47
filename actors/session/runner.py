"""One runner per session: an actor whose mailbox serialises admits, turn ends and aborts.

Invariants (docs/ARCHITECTURE.md §4) hold by construction: a prompt is answered "recorded"
only after its records are in the log; "anything pending?" and "go idle" are one mailbox step
(``_after_turn``); one turn at a time, later prompts coalesced into the next; the
generation advances only on a commit; an abort leaves a provisional record and no commit;
every way out of a turn passes ``_after_turn``, which publishes ``idle`` when nothing waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from actors.session.admit import SessionLimits
from actors.session.admitting import Admitter
from actors.session.conversation import WindowCut, conversation
from actors.session.io import RunnerIO
from actors.session.mailbox import (
    Abort,
    Admit,
    Command,
    Delete,
    Resume,
    TurnDone,
    chain,
    fail,
    wait_set,
)
from actors.session.records import new_id
from actors.session.state import RETRIED_REASONS, SessionState, parents_of, supersedes_of
from actors.session.turn import (
    Turn,
    aborted_result,
    chat_done_fields,
    chat_start_fields,
    failed_result,
    record_abort,
    record_commit,
    record_failure,
)
from schemas.errors import ErrorCode, InferError
from schemas.internal import AdmitReply, AdmitRequest, GenerateRequest, GenerateResult
from schemas.messages import AbortReply, StartedEvent, StatusEvent
from schemas.records import (
    DeleteRecord,
    ReplyParams,
    TurnParams,
    TurnStartRecord,
)
from schemas.subjects import EventKind

log = structlog.get_logger("session_runner")

RETRY_AFTER_S = 1.0
"""How soon a runner tries again to record a turn's start or end the log did not take."""
MAX_RERUN_WAIT_S = 30.0
"""Longest back-off before rerunning a turn the bus failed again and again."""

__all__ = ["SessionRunner"]


class SessionRunner:
    """The actor of one session."""

    def __init__(
        self, io: RunnerIO, state: SessionState, limits: SessionLimits,
        inflight: Callable[[], int],
    ) -> None:
        self.io = io
        self.state = state
        self.admitter = Admitter(io, state, limits)
        """Checks and records the prompts admitted here, within ``limits`` (a step of this
        mailbox)."""
        self.inflight = inflight
        """Turns running on the node now (for the log lines)."""
        self.session = state.session
        self.cut = WindowCut()
        """Where the session's window starts, kept between its turns."""
        self.mailbox: asyncio.Queue[Command] = asyncio.Queue()
        self.turn: Turn | None = None
        self.deleting: asyncio.Future[None] | None = None
        self.closed = False
        self.stopping = False
        self.log = log.bind(actor="session_runner", session=self.session)
        self.idle = asyncio.Event()
        """Set while no turn runs (tests and shutdown wait on it)."""
        self.idle.set()
        self._closed_error = InferError(ErrorCode.UNAVAILABLE, "the node is stopping")
        self._turn_task: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self._reruns = 0
        """Turns in a row the bus failed (the back-off before the next rerun grows)."""
        self._rerun_at = 0.0
        """``time.monotonic()`` before which no rerun starts."""
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"runner:{self.session}"
        )

    # -- mailbox ---------------------------------------------------------------------------
    def submit(self, req: AdmitRequest) -> asyncio.Future[AdmitReply]:
        """Queue a prompt; the future resolves once it is in the log (or refused)."""
        done: asyncio.Future[AdmitReply] = asyncio.get_running_loop().create_future()
        self._enqueue(Admit(req, done))
        return done

    async def abort(self, reason: str) -> AbortReply:
        """Abort the running turn; resolves once its abort is recorded."""
        done: asyncio.Future[AbortReply] = asyncio.get_running_loop().create_future()
        self._enqueue(Abort(reason, done))
        return await done

    async def delete(self) -> None:
        """Delete the session once an in-flight turn has ended and its records are written.

        Returns once the delete record is in the log and the runner is closed; what is left
        to do (tombstone, engine state, old records) is its host's.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(Delete(done))
        await done

    def resume(self) -> None:
        """Answer what is pending (after a rebuild, or a start that could not be recorded)."""
        self._retry = None
        if not self.closed:
            self.mailbox.put_nowait(Resume())

    def _enqueue(self, cmd: Command) -> None:
        if self.closed:
            fail(cmd, self._closed_error)
        else:
            self.mailbox.put_nowait(cmd)

    async def _run(self) -> None:
        while not self.closed:
            cmd = await self.mailbox.get()
            try:
                await self._handle(cmd)
            except Exception as e:  # one bad command must not stop the session
                self.log.exception("runner_command_failed", error=str(e))
                fail(cmd, e)
        self._reject_left()

    async def _handle(self, cmd: Command) -> None:
        if isinstance(cmd, Admit):
            await self.on_admit(cmd)
        elif isinstance(cmd, TurnDone):
            await self.on_turn_done(cmd.turn, cmd.result)
        elif isinstance(cmd, Abort):
            await self.on_abort(cmd)
        elif isinstance(cmd, Delete):
            await self.on_delete(cmd.done)
        elif self.turn is None:
            await self._after_turn()

    async def on_admit(self, cmd: Admit) -> None:
        """Record the prompt (the admitter's step), then start a turn over it if none runs."""
        recorded = await self.admitter.admit(cmd, self.turn is not None, self.deleting is not None)
        if recorded and self.turn is None:
            await self._after_turn()

    def _reject_left(self) -> None:
        while not self.mailbox.empty():
            fail(self.mailbox.get_nowait(), self._closed_error)

    # -- turns -----------------------------------------------------------------------------
    async def _after_turn(self) -> None:
        """The one step that either starts the next turn or goes idle: no lost wake-up."""
        if self.deleting is not None:
            await self._finish_delete()
            if self.closed:
                return
        if not self.stopping and self.state.wants_turn():
            wait = self._rerun_at - time.monotonic()
            if wait > 0:  # a turn the bus failed: its rerun waits out the back-off
                if self._retry is None:
                    self._retry = asyncio.get_running_loop().call_later(wait, self.resume)
            elif await self._start_turn():
                return
        if not self.stopping:
            self.state.fold_unanswered_appends()
        await self._status("idle")
        self.idle.set()

    async def _start_turn(self) -> bool:
        """Start a turn over everything pending; False if its start could not be recorded."""
        st = self.state
        taken = st.take_pending()
        params = next((p.record.params for p in reversed(taken) if p.wants_reply), TurnParams())
        queued_at = min(p.record.ts for p in taken if p.wants_reply)
        turn = Turn(
            new_id("turn"), taken, parents_of(taken), supersedes_of(taken), params,
            queue_ms=max(0.0, (time.time() - queued_at) * 1000),
        )
        try:
            await self.io.append(self.session, TurnStartRecord(
                id=turn.id, parent_ids=turn.parent_ids,
                input_ids=tuple(p.record.id for p in taken), ts=time.time(),
            ))
        except Exception as e:
            st.put_back(taken)
            self.log.warning("turn_start_not_recorded", error=repr(e), retry_s=RETRY_AFTER_S)
            if self._retry is None:
                self._retry = asyncio.get_running_loop().call_later(RETRY_AFTER_S, self.resume)
            return False
        self.turn = turn
        self.idle.clear()
        await self._status("busy")
        await self.io.event(self.session, EventKind.STARTED, StartedEvent(
            session=self.session, turn_id=turn.id, parent_ids=turn.parent_ids,
            generation=st.generation,
        ))
        whole = params.overflow == "refuse"
        # The messages the state dropped are read back from the log, in the turn's task.
        convo = conversation(st, taken, self.cut, whole=whole and not st.dropped)
        messages = len(convo.messages) + convo.omitted
        fields = chat_start_fields(turn, messages, st.generation, self.inflight())
        self.log.info("chat_start", **fields)
        req = GenerateRequest(
            session=self.session, turn_id=turn.id, messages=convo.messages,
            assistant_tokens=convo.assistant_tokens, model_id=convo.model_id,
            generation=st.generation, params=ReplyParams.of(params),
            token_subject=self.io.token_subject(self.session), queue_ms=turn.queue_ms,
            tools=st.tools,
            window_start=convo.window_start, omitted=convo.omitted,
            omitted_turns=convo.omitted_turns,
        )
        reread = whole and st.dropped > 0
        self._turn_task = asyncio.get_running_loop().create_task(
            self._generate(turn, req, reread)
        )
        return True

    async def _generate(self, turn: Turn, req: GenerateRequest, reread: bool = False) -> None:
        try:
            if reread:
                req = await self._whole_request(turn, req)
            result = await self.io.generate(req)
        except InferError as e:
            result = failed_result(req, e)
        except asyncio.CancelledError:  # given up on stop: the turn is recorded as aborted
            self.mailbox.put_nowait(TurnDone(turn, aborted_result(req)))
            raise
        except Exception as e:
            result = failed_result(req, InferError(ErrorCode.INTERNAL, f"the turn failed: {e}"))
        self.mailbox.put_nowait(TurnDone(turn, result))

    async def _whole_request(self, turn: Turn, req: GenerateRequest) -> GenerateRequest:
        """``req`` over the whole conversation, the messages before the window read back from
        the record log (an ``overflow: refuse`` turn judges them all)."""
        st = self.state
        history = await self.io.history(self.session)
        if len(history) != st.history_len() or history[-1:] != st.history[-1:]:
            raise InferError(
                ErrorCode.UNAVAILABLE,
                f"the record log of session {self.session} did not give back its whole "
                f"history ({len(history)} of {st.history_len()} messages); try again",
            )
        convo = conversation(st, turn.taken, self.cut, whole=True, history=history)
        return req.model_copy(update={
            "messages": convo.messages, "assistant_tokens": convo.assistant_tokens,
            "model_id": convo.model_id, "window_start": convo.window_start,
            "omitted": 0, "omitted_turns": 0,
        })

    async def on_turn_done(self, turn: Turn, r: GenerateResult) -> None:
        """Commit, or record the honest provisional of an aborted or failed turn."""
        outcome = "failed"
        try:
            outcome = await self._record_end(turn, r)
        except Exception as e:
            self.log.exception("turn_end_not_recorded", turn=turn.id, error=repr(e))
            if not turn.recorded and not (self.stopping or self.closed):
                # The turn stays the running one and its end is recorded once the log is
                # back: a second turn start over the same input would not replay.
                self._later(RETRY_AFTER_S, lambda: self.mailbox.put_nowait(TurnDone(turn, r)))
                return
            if not turn.recorded:  # its input waits again, as if the turn never ran
                self.state.put_back(turn.taken)
        self.turn = None
        self._turn_task = None
        stopped = outcome != "committed"
        for fut in turn.abort_waiters:
            if not fut.done():
                fut.set_result(AbortReply(session=self.session, aborted=stopped, turn_id=turn.id))
        self.log.info("chat_done", **chat_done_fields(
            turn, r, outcome, self.state.generation, self.inflight()
        ))
        await self._after_turn()

    async def _record_end(self, turn: Turn, r: GenerateResult) -> str:
        """Record how the turn ended; its outcome for the ``chat_done`` line."""
        lost = r.error is not None and r.error.code == ErrorCode.UNAVAILABLE
        if r.error is not None and not (lost and turn.abort_waiters):
            if await record_failure(self.io, self.state, turn, r) in RETRIED_REASONS:
                # Run it again, later each time the bus fails it again.
                self._rerun_at = time.monotonic() + min(
                    RETRY_AFTER_S * 2**self._reruns, MAX_RERUN_WAIT_S
                )
                self._reruns += 1
            return "failed"
        if r.finish_reason == "aborted" or turn.abort_waiters:
            # An agent that asked for an abort gets one, even when the engine finished
            # the turn (or the bus lost its result) before the cancel reached it.
            await record_abort(self.io, self.state, turn, r.raw_text, turn.abort_reason)
            return "aborted"
        await record_commit(self.io, self.state, turn, r)
        self._reruns = 0
        return "committed"

    def _later(self, delay: float, then: Callable[[], None]) -> None:
        """Run ``then`` after ``delay`` seconds unless the runner closed meanwhile."""
        def fire() -> None:
            self._timers.discard(handle)
            if not self.closed:
                then()

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    # -- abort / delete / stop -------------------------------------------------------------
    async def on_abort(self, cmd: Abort) -> None:
        """Cancel the running turn; the reply waits until its abort is recorded."""
        turn = self.turn
        if turn is None:
            cmd.done.set_result(AbortReply(session=self.session, aborted=False))
            return
        turn.abort_reason = cmd.reason
        turn.abort_waiters.append(cmd.done)
        await self.io.cancel_engine(self.session, turn.id)

    async def on_delete(self, done: asyncio.Future[None]) -> None:
        """Delete now, or once the running turn has ended and its records are written."""
        if self.deleting is not None:
            self.deleting.add_done_callback(lambda f: chain(f, done))
            return
        self.deleting = done
        if self.turn is not None:
            self.turn.abort_reason = "deleted"
            await self.io.cancel_engine(self.session, self.turn.id)
            return
        await self._after_turn()

    async def _finish_delete(self) -> None:
        done = self.deleting
        assert done is not None
        try:
            await self.io.append(self.session, DeleteRecord(id=new_id("del"), ts=time.time()))
        except Exception as e:
            self.deleting = None
            self.log.warning("delete_not_recorded", error=repr(e))
            if not done.done():
                done.set_exception(InferError(
                    ErrorCode.UNAVAILABLE, f"the deletion could not be recorded ({e!r}); retry"
                ))
            return
        self.closed = True
        self._closed_error = InferError(ErrorCode.GONE, f"session {self.session} was deleted")
        if self._retry is not None:
            self._retry.cancel()
        for timer in self._timers:
            timer.cancel()
        if not done.done():
            done.set_result(None)
        self.idle.set()

    async def stop_turn(self, wait_s: float) -> None:
        """Stop starting turns; abort a running one (retried after a restart), bounded."""
        self.stopping = True
        turn = self.turn
        if turn is None:
            return
        turn.abort_reason = "shutdown"
        await self.io.cancel_engine(self.session, turn.id)
        if await wait_set(self.idle, wait_s):
            return
        self.log.warning("engine_did_not_stop", turn=turn.id, waited_s=wait_s)
        if self._turn_task is not None:
            self._turn_task.cancel()
        await wait_set(self.idle, wait_s)

    async def finish_turn(self, wait_s: float) -> None:
        """Start no new turn; let a running one finish (bounded), else abort it as a stop
        does. What is still pending stays in the log for the session's next owner."""
        self.stopping = True
        if not await wait_set(self.idle, wait_s):
            await self.stop_turn(wait_s)

    async def drop(self) -> None:
        """Stop at once, recording nothing: another node owns the session now and runs
        its pending prompts (and closes a cut turn) from the record log."""
        self.stopping = True
        if self.turn is not None:
            await self.io.cancel_engine(self.session, self.turn.id)
        await self.close()

    async def close(self) -> None:
        """Stop the mailbox; what is left in it is answered ``unavailable``."""
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
        for timer in self._timers:
            timer.cancel()
        for task in (self._task, self._turn_task):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._reject_left()

    async def _status(self, state: str) -> None:
        await self.io.event(self.session, EventKind.STATUS, StatusEvent(
            session=self.session, state=state,  # type: ignore[arg-type]
            generation=self.state.generation, pending=len(self.state.pending),
        ))
