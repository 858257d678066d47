"""The session-runner host: creates one runner per session and routes to its mailbox.

It owns the record log (JetStream) and rebuilds every session from it at start, turning an
interrupted turn into an honest provisional/aborted record whose prompts are answered again.
It also logs a periodic stats heartbeat (sessions, turns in flight, RSS).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

import psutil
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import BaseModel

from actors.base import Actor, encode, parse_reply
from actors.session.runner import SessionRunner, new_id
from actors.session.state import SessionState, apply
from schemas.chat import ChatMessage
from schemas.errors import ErrorCode, InferError
from schemas.internal import (
    AdmitReply,
    AdmitRequest,
    BankCommitRequest,
    CancelRequest,
    ForgetRequest,
    GenerateRequest,
    GenerateResult,
    SessionDeleteReply,
    SessionDeleteRequest,
    TurnStatusReply,
    TurnStatusRequest,
)
from schemas.messages import AbortRequest, PromptRequest
from schemas.records import (
    RECORD_ADAPTER,
    AbortRecord,
    DeleteRecord,
    ProvisionalRecord,
    Record,
    TurnParams,
)
from schemas.subjects import ABORTED_HEADER, MSG_ID_HEADER, EventKind, Subjects, is_session_id


class RunnerHost(Actor):
    """Routes admits, aborts and session control to per-session runners."""

    name = "session_runners"

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        max_pending: int = 64,
        max_sessions: int = 4096,
        tombstones: int = 1024,
        turn_timeout_s: float = 3600.0,
        heartbeat_s: float = 30.0,
        stop_wait_s: float = 10.0,
        probe_s: float = 10.0,
    ) -> None:
        super().__init__(nc, subjects)
        self.js: JetStreamContext = nc.jetstream()
        self.max_pending = max_pending
        self.max_sessions = max_sessions
        self.turn_timeout_s = turn_timeout_s
        self.heartbeat_s = heartbeat_s
        self.stop_wait_s = stop_wait_s
        self.probe_s = probe_s
        """How often a turn waiting on the engine asks whether it still runs."""
        self.runners: dict[str, SessionRunner] = {}
        self.tombstones: OrderedDict[str, float] = OrderedDict()
        self.max_tombstones = tombstones
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Rebuild sessions from the record log, then subscribe and resume."""
        await self._rebuild()
        s = self.subjects
        await self.subscribe(s.admit_all(), self.on_admit)
        await self.subscribe(s.abort_all(), self.on_abort)
        await self.subscribe(s.session_control_all(), self.on_control)
        for runner in self.runners.values():
            runner.resume()
        if self.heartbeat_s > 0:
            self.spawn(self._heartbeat(), "heartbeat")

    async def stop(self) -> None:
        """Abort running turns (retried after a restart), finish what is queued, close."""
        self._stopping.set()
        runners = list(self.runners.values())
        await asyncio.gather(*(r.stop_turn(self.stop_wait_s) for r in runners))
        # Requests already delivered are still answered: admits are recorded (no new turn
        # starts), aborts find nothing running, deletes complete.
        await super().stop()
        await asyncio.gather(*(r.close() for r in list(self.runners.values())))

    # -- handlers --------------------------------------------------------------------------
    async def on_admit(self, msg: Msg) -> None:
        """Admission asks a runner to record a prompt."""
        req = AdmitRequest.model_validate_json(msg.data)
        if req.session in self.tombstones:
            raise InferError(
                ErrorCode.GONE, f"session {req.session} was deleted; use a new session id"
            )
        runner = self.runners.get(req.session)
        if runner is None:
            if req.prompt.expect_generation:
                raise InferError(
                    ErrorCode.UNKNOWN_SESSION,
                    f"session {req.session} does not exist, so it cannot be at generation "
                    f"{req.prompt.expect_generation}",
                )
            if not req.prompt.messages:
                raise InferError(
                    ErrorCode.UNKNOWN_SESSION,
                    f"session {req.session} does not exist, so it has no turn to retry",
                )
            if len(self.runners) >= self.max_sessions:
                raise InferError(
                    ErrorCode.BUSY,
                    f"the node holds its maximum of {self.max_sessions} sessions; delete one "
                    "or raise --max-sessions",
                )
            runner = self._runner(SessionState(req.session))
        # Queued in the runner's mailbox now, in arrival order; the answer waits for the
        # record append, which must not hold up other sessions' admits.
        admitted = runner.submit(req)
        self.spawn(self._boundary(lambda m: self._answer_admit(m, admitted), msg), "admit")

    async def _answer_admit(self, msg: Msg, admitted: asyncio.Future[AdmitReply]) -> None:
        await self.respond(msg, await admitted)

    async def on_abort(self, msg: Msg) -> None:
        """An agent aborts the running turn of a session (answered once it is recorded)."""
        session = self.subjects.session_of_abort(msg.subject)
        body = AbortRequest.model_validate_json(msg.data) if msg.data.strip() else AbortRequest()
        runner = self._known(session)
        # Waiting for the engine must not hold up other sessions' aborts: answer in a task.
        self.spawn(self._boundary(lambda m: self._answer_abort(m, runner, body), msg), "abort")

    async def _answer_abort(self, msg: Msg, runner: SessionRunner, body: AbortRequest) -> None:
        await self.respond(msg, await runner.abort(body.reason))

    async def on_control(self, msg: Msg) -> None:
        """Admin: delete one session (answered once its records are written)."""
        req = SessionDeleteRequest.model_validate_json(msg.data)
        session = self.subjects.session_of_control(msg.subject)
        if req.session != session:
            raise InferError(
                ErrorCode.BAD_REQUEST, f"a delete of {req.session!r} was sent for {session!r}"
            )
        runner = self._known(session)
        self.spawn(self._boundary(lambda m: self._answer_delete(m, runner), msg), "delete")

    async def _answer_delete(self, msg: Msg, runner: SessionRunner) -> None:
        await runner.delete()
        await self.respond(msg, SessionDeleteReply(session=runner.session))

    def _known(self, session: str) -> SessionRunner:
        if not is_session_id(session):
            raise InferError(ErrorCode.BAD_REQUEST, f"{session[:64]!r} is not a valid session id")
        if session in self.tombstones:
            raise InferError(ErrorCode.GONE, f"session {session} was deleted")
        runner = self.runners.get(session)
        if runner is None:
            raise InferError(ErrorCode.UNKNOWN_SESSION, f"session {session} does not exist")
        return runner

    def _runner(self, state: SessionState) -> SessionRunner:
        runner = SessionRunner(self, state)
        self.runners[state.session] = runner
        return runner

    # -- RunnerIO --------------------------------------------------------------------------
    async def append(self, session: str, record: Record) -> None:
        """Append a record to the session's durable log (returns once stored)."""
        await self.js.publish(
            self.subjects.records(session), encode(record), headers={MSG_ID_HEADER: record.id}
        )

    async def event(
        self, session: str, kind: EventKind, model: BaseModel, aborted: bool = False
    ) -> None:
        """Publish a session event."""
        headers = {ABORTED_HEADER: "1"} if aborted else None
        await self.publish(self.subjects.events(session, kind), model, headers)

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        """Ask the engine for a turn and wait for its result.

        A result published while this connection reconnects is lost for good, and the turn
        would wait out ``turn_timeout_s``. So every ``probe_s`` the runner asks the engine
        whether the turn still runs; when it does not and no result came, the turn fails
        as unavailable (its prompts stay recorded) instead of hanging.
        """
        request = asyncio.ensure_future(self.nc.request(
            self.subjects.engine_generate(), encode(req), timeout=self.turn_timeout_s
        ))
        try:
            while True:
                done, _ = await asyncio.wait({request}, timeout=self.probe_s)
                if done or await self._engine_runs(req):
                    if done:
                        break
                    continue
                # Not running: give a result already on its way a moment to arrive.
                done, _ = await asyncio.wait({request}, timeout=min(self.probe_s, 2.0))
                if done:
                    break
                raise InferError(
                    ErrorCode.UNAVAILABLE,
                    "the engine finished this turn but its result was lost (NATS reconnected "
                    "meanwhile); the prompt is kept: send an empty prompt to retry it",
                )
            reply = request.result()
        except InferError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise InferError(ErrorCode.UNAVAILABLE, f"no engine answered: {e!r}") from e
        finally:
            if not request.done():
                request.cancel()
        return parse_reply(reply.data, reply.headers, GenerateResult)

    async def _engine_runs(self, req: GenerateRequest) -> bool:
        """True unless the engine answers that the turn is not running."""
        probe = TurnStatusRequest(session=req.session, turn_id=req.turn_id)
        try:
            msg = await self.nc.request(
                self.subjects.engine_turn_status(), encode(probe), timeout=min(self.probe_s, 5.0)
            )
            status: TurnStatusReply = parse_reply(msg.data, msg.headers, TurnStatusReply)
        except Exception:  # no answer is no evidence: keep waiting for the result
            return True
        return status.running

    async def cancel_engine(self, session: str, turn_id: str) -> None:
        """Tell the engine to stop a turn."""
        await self.publish(
            self.subjects.engine_cancel(session), CancelRequest(session=session, turn_id=turn_id)
        )

    async def bank_commit(
        self, session: str, turn_id: str, generation: int, result: GenerateResult
    ) -> None:
        """Hand the committed turn to the bank committer (fire and forget)."""
        await self.publish(self.subjects.bank_commit(), BankCommitRequest(
            session=session, turn_id=turn_id, generation=generation, n_tokens=result.n_tokens,
            token_hash=result.token_hash,
        ))

    async def relay(
        self, target: str, source: str, turn_id: str, text: str,
        params: TurnParams | None = None,
    ) -> None:
        """Send a finished answer as a prompt to another session, through intake, once.

        The relayed prompt is answered with the source turn's sampling, stop and max_tokens.
        """
        key = f"relay-{turn_id}"
        given = params or TurnParams()
        prompt = PromptRequest(
            messages=(ChatMessage(role="user", content=text, name=source),), idempotency_key=key,
            sampling=given.sampling, stop=given.stop, max_tokens=given.max_tokens,
        )
        await self.js.publish(
            self.subjects.prompt(target), encode(prompt), headers={MSG_ID_HEADER: key}
        )

    def token_subject(self, session: str) -> str:
        """Where the engine publishes this session's tokens."""
        return self.subjects.events(session, EventKind.TOKEN)

    def inflight(self) -> int:
        """Turns running on this node now."""
        return sum(1 for r in self.runners.values() if r.turn is not None)

    async def deleted(self, session: str) -> None:
        """Record the deletion and leave a tombstone; then free engine state and old records."""
        await self.append(session, DeleteRecord(id=new_id("del"), ts=time.time()))
        # From here on the host answers gone (410) itself; the runner is no longer reachable.
        self.runners.pop(session, None)
        self.tombstones[session] = time.time()
        self.tombstones.move_to_end(session)
        while len(self.tombstones) > self.max_tombstones:
            self.tombstones.popitem(last=False)
        try:
            await self.nc.request(
                self.subjects.engine_forget(), encode(ForgetRequest(session=session)), timeout=5
            )
        except Exception as e:  # the bank keeps stale bytes until LRU; not worth failing
            self.log.warning("forget_failed", session=session, error=repr(e))
        try:  # the delete record stays: it is the durable tombstone a restart rebuilds from
            await self.js.purge_stream(
                self.subjects.record_stream, subject=self.subjects.records(session), keep=1
            )
        except Exception as e:  # the records are dead weight, not a wrong state
            self.log.warning("purge_failed", session=session, error=repr(e))

    # -- heartbeat -------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        process = psutil.Process()
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.heartbeat_s)
                return
            except TimeoutError:
                pass
            rss = await asyncio.to_thread(lambda: process.memory_info().rss)
            self.log.info(
                "stats_heartbeat", sessions=len(self.runners), inflight=self.inflight(),
                pending=sum(len(r.state.pending) for r in self.runners.values()),
                tombstones=len(self.tombstones), rss_bytes=rss, errors=self.errors,
            )

    # -- rebuild ---------------------------------------------------------------------------
    async def _rebuild(self) -> None:
        states: dict[str, SessionState] = {}
        async for session, record in self._read_records():
            if isinstance(record, DeleteRecord):
                states.pop(session, None)
                self.tombstones[session] = record.ts
                self.tombstones.move_to_end(session)
                continue
            self.tombstones.pop(session, None)
            apply(states.setdefault(session, SessionState(session)), record)
        while len(self.tombstones) > self.max_tombstones:
            self.tombstones.popitem(last=False)
        for state in states.values():
            if state.open_turn is not None:
                await self._close_interrupted(state)
            self._runner(state)
        if states:
            self.log.info("sessions_rebuilt", sessions=len(states))

    async def _close_interrupted(self, state: SessionState) -> None:
        turn = state.open_turn
        assert turn is not None
        provisional = ProvisionalRecord(
            id=new_id("prov"), turn_id=turn.id, message=ChatMessage(role="assistant", content=""),
            parent_ids=turn.parent_ids, ts=time.time(),
        )
        abort = AbortRecord(
            id=new_id("abort"), turn_id=turn.id, provisional_id=provisional.id,
            reason="node_restart", ts=time.time(),
        )
        for record in (provisional, abort):
            await self.append(state.session, record)
            apply(state, record)
        self.log.info("interrupted_turn_recorded", session=state.session, turn=turn.id)

    async def _read_records(self) -> AsyncIterator[tuple[str, Record]]:
        try:
            info = await self.js.stream_info(self.subjects.record_stream)
        except NotFoundError:
            return
        last = info.state.last_seq
        if info.state.messages == 0:
            return
        sub = await self.js.subscribe(
            self.subjects.records_all(), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        prefix = len(self.subjects.records(""))
        try:
            while True:
                msg = await sub.next_msg(timeout=10)
                yield msg.subject[prefix:], RECORD_ADAPTER.validate_json(msg.data)
                if msg.metadata.sequence.stream >= last:
                    return
        finally:
            await sub.unsubscribe()


__all__ = ["RunnerHost"]
