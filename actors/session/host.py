"""The session-runner host: creates one runner per session and routes to its mailbox.

It keeps the registry of runners and the tombstones of deleted sessions, and is the only one
to change them: a runner records its own deletion, then its host retires it. It serves only
the sessions of the partitions this node owns (``actors.ownership``) and stays silent on the
others, which another node answers. At start, and whenever it gains partitions (another node
died), it rebuilds their sessions from the record log (``records``), turning an interrupted
turn into an honest provisional/aborted record whose prompts are answered again (unless
the node's death has cut a turn over them ``CRASH_LIMIT`` times: then they are set aside,
with an ``error`` event); when it
loses partitions it drops their runners at once, recording nothing; when it hands partitions
over (another node joined) it lets their turns in flight finish, has the engine make each
session's last commit durable, then drops them. The bus a runner speaks is ``BusIO``; the
records of all of them go through one ``RecordAppender``, which the host tells what a rebuild
found. After a deletion the host frees the engine's state and the old records itself. It
also logs a periodic stats heartbeat (sessions, turns in flight, RSS).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

import psutil
from nats.aio.client import Client
from nats.aio.msg import Msg

from actors.balance import Heat
from actors.base import Actor, encode, parse_reply
from actors.ownership import Ownership
from actors.session.admit import NodeBytes, SessionLimits
from actors.session.appender import RecordAppender
from actors.session.io import BusIO
from actors.session.records import close_interrupted, rebuild
from actors.session.runner import SessionRunner
from actors.session.state import CRASH_LIMIT, CRASHED, SessionState
from actors.session.turn import publish_abort, publish_set_aside
from schemas.errors import ErrorCode, InferError
from schemas.internal import (
    AdmitReply,
    AdmitRequest,
    AdoptReply,
    AdoptRequest,
    BankFlushReply,
    BankFlushRequest,
    ForgetReply,
    ForgetRequest,
    SessionDeleteReply,
    SessionDeleteRequest,
)
from schemas.messages import AbortRequest
from schemas.subjects import Subjects, is_session_id

FORGET_TIMEOUT_S = 5.0
"""Longest wait for the engine to drop a deleted session's state."""
ADOPT_TIMEOUT_S = 60.0
"""Longest wait for the engine to index the banked snapshots of sessions that moved here."""
FLUSH_MARGIN_S = 30.0
"""Extra time for the durable writes of a hand-over on top of the engine's slot wait."""


class Tombstones(OrderedDict[str, float]):
    """Recently deleted sessions (answered 410), oldest first, at most ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def add(self, session: str, ts: float) -> None:
        """Remember ``session`` as deleted at ``ts``; the oldest beyond the limit go."""
        self[session] = ts
        self.move_to_end(session)
        while len(self) > self.limit:
            self.popitem(last=False)


@dataclass(frozen=True)
class HostSettings:
    """The runner host's part of the node configuration."""

    max_pending: int
    """Messages one session may have waiting for a turn."""
    max_pending_bytes: int
    """Bytes of messages one session may have waiting for a turn."""
    max_session_bytes: int
    """Bytes of messages one session may record in all."""
    max_node_bytes: int
    """Bytes of messages all sessions of the node may hold together."""
    max_sessions: int
    """Sessions held at once."""
    tombstones: int
    """Deleted session ids remembered (answered 410)."""
    turn_timeout_s: float
    """Longest wait for the engine's result of one turn."""
    turn_probe_s: float
    """How often a turn waiting on the engine asks whether it still runs."""
    heartbeat_s: float
    """Seconds between stats heartbeat log lines; 0 turns them off."""
    stop_wait_s: float
    """How long stopping waits for a cut turn's abort to be recorded."""


class RunnerHost(Actor):
    """Routes admits, aborts and session control to per-session runners."""

    name = "session_runners"

    def __init__(
        self, nc: Client, subjects: Subjects, settings: HostSettings, ownership: Ownership
    ) -> None:
        super().__init__(nc, subjects)
        self.settings = settings
        self.ownership = ownership
        self.appender = RecordAppender(nc.jetstream(), subjects, ownership)
        """The one writer of the record logs of the sessions served here."""
        self.io = BusIO(
            nc, subjects, settings.turn_timeout_s, settings.turn_probe_s, self.appender
        )
        self.limits = SessionLimits(
            settings.max_pending, settings.max_pending_bytes, settings.max_session_bytes,
            NodeBytes(settings.max_node_bytes, self.held_bytes),
        )
        self.runners: dict[str, SessionRunner] = {}
        self.tombstones = Tombstones(settings.tombstones)
        self._stopping = asyncio.Event()
        self._last_admit: dict[str, float] = {}
        """``time.monotonic()`` of each session's last prompt (how hot it is)."""

    async def start(self) -> None:
        """Rebuild the owned partitions' sessions from the record log, subscribe, resume."""
        self.ownership.join(self)
        self.ownership.rank_by(self.heat)
        rebuilt = await self._rebuild(self.ownership.held())
        s = self.subjects
        await self.subscribe(s.admit_all(), self.on_admit)
        await self.subscribe(s.abort_all(), self.on_abort)
        await self.subscribe(s.session_control_all(), self.on_control)
        for runner in rebuilt:
            runner.resume()
        if self.settings.heartbeat_s > 0:
            self.spawn(self._heartbeat(), "heartbeat")

    async def gain(self, partitions: frozenset[int]) -> None:
        """Rebuild the sessions of partitions taken over, and answer what they have pending."""
        if self._stopping.is_set():
            return
        rebuilt = await self._rebuild(partitions)
        if rebuilt:  # before their turns run: restored from the shared bank, not recomputed
            await self._adopt(tuple(r.session for r in rebuilt))
        for runner in rebuilt:
            runner.resume()

    async def lose(self, partitions: frozenset[int]) -> None:
        """Drop the runners of partitions another node owns now; they record nothing more."""
        dropped = [
            r for s, r in self.runners.items() if self.ownership.partition(s) in partitions
        ]
        for runner in dropped:
            del self.runners[runner.session]
            self._last_admit.pop(runner.session, None)
        await asyncio.gather(*(r.drop() for r in dropped))
        self.log.info("sessions_dropped", partitions=sorted(partitions), sessions=len(dropped))

    async def hand_over(self, partitions: frozenset[int]) -> None:
        """Let the partitions' turns in flight finish (bounded, then aborted), bank each
        session's last commit durably, then drop the runners: the next owner restores."""
        leaving = [
            r for s, r in self.runners.items() if self.ownership.partition(s) in partitions
        ]
        wait_s = self.settings.stop_wait_s
        await asyncio.gather(*(r.finish_turn(wait_s) for r in leaving))
        flushed = await self._bank_flush(self.io.banked([r.session for r in leaving]), wait_s)
        for runner in leaving:
            if self.runners.get(runner.session) is runner:
                del self.runners[runner.session]
            self.io.forget_banked(runner.session)
            self._last_admit.pop(runner.session, None)
        await asyncio.gather(*(r.close() for r in leaving))
        self.log.info(
            "sessions_handed_over", partitions=sorted(partitions), sessions=len(leaving),
            banked=flushed.stored if flushed else 0,
            missed=dict(flushed.missed) if flushed else "no answer",
        )

    def heat(self, partition: int) -> Heat:
        """How hot ``partition`` is here: sessions busy or waiting, sessions, then how
        recently a prompt arrived (the coldest partitions are handed over first)."""
        mine = [r for s, r in self.runners.items() if self.ownership.partition(s) == partition]
        busy = sum(1 for r in mine if r.turn is not None or r.state.pending)
        last = max((self._last_admit.get(r.session, 0.0) for r in mine), default=0.0)
        return (busy, len(mine), last)

    async def stop(self) -> None:
        """Abort running turns (retried after a restart), finish what is queued, close."""
        self._stopping.set()
        runners = list(self.runners.values())
        await asyncio.gather(*(r.stop_turn(self.settings.stop_wait_s) for r in runners))
        # Requests already delivered are still answered: admits are recorded (no new turn
        # starts), aborts find nothing running, deletes complete.
        await super().stop()
        await asyncio.gather(*(r.close() for r in list(self.runners.values())))

    # -- handlers --------------------------------------------------------------------------
    async def on_admit(self, msg: Msg) -> None:
        """Admission asks a runner to record a prompt."""
        req = AdmitRequest.model_validate_json(msg.data)
        if not self.ownership.owns(req.session):
            return  # the owner's admission asked; this node's did not
        if req.session in self.tombstones:
            raise InferError(
                ErrorCode.GONE, f"session {req.session} was deleted; use a new session id"
            )
        runner = self.runners.get(req.session)
        if runner is None:
            if req.prompt.relay_from is not None:  # never creates a session: none granted it
                raise InferError(
                    ErrorCode.UNKNOWN_SESSION,
                    f"session {req.session} does not exist, so it accepts no relays from "
                    f"{req.prompt.relay_from}",
                    {"relay_from": req.prompt.relay_from},
                )
            if req.prompt.expect_generation:
                raise InferError(
                    ErrorCode.UNKNOWN_SESSION,
                    f"session {req.session} does not exist, so it cannot be at generation "
                    f"{req.prompt.expect_generation}",
                )
            if not req.prompt.messages and req.prompt.accept_relays_from is None:
                raise InferError(
                    ErrorCode.UNKNOWN_SESSION,
                    f"session {req.session} does not exist, so it has no turn to retry",
                )
            if len(self.runners) >= self.settings.max_sessions:
                raise InferError(
                    ErrorCode.BUSY,
                    f"the node holds its maximum of {self.settings.max_sessions} sessions; "
                    "delete one or raise --max-sessions",
                )
            runner = self._runner(SessionState(req.session))
        self._last_admit[req.session] = time.monotonic()
        # Queued in the runner's mailbox now, in arrival order; the answer waits for the
        # record append, which must not hold up other sessions' admits.
        admitted = runner.submit(req)
        self.spawn(self._boundary(lambda m: self._answer_admit(m, admitted), msg), "admit")

    async def _answer_admit(self, msg: Msg, admitted: asyncio.Future[AdmitReply]) -> None:
        await self.respond(msg, await admitted)

    async def on_abort(self, msg: Msg) -> None:
        """An agent aborts the running turn of a session (answered once it is recorded)."""
        session = self.subjects.session_of_abort(msg.subject)
        if not self.ownership.owns(session):
            return  # the node owning the session answers
        body = (
            AbortRequest.model_validate_json(msg.data, strict=True)
            if msg.data.strip() else AbortRequest()
        )
        runner = self._known(session)
        # Waiting for the engine must not hold up other sessions' aborts: answer in a task.
        self.spawn(self._boundary(lambda m: self._answer_abort(m, runner, body), msg), "abort")

    async def _answer_abort(self, msg: Msg, runner: SessionRunner, body: AbortRequest) -> None:
        await self.respond(msg, await runner.abort(body.reason))

    async def on_control(self, msg: Msg) -> None:
        """Admin: delete one session (answered once its records are written)."""
        session = self.subjects.session_of_control(msg.subject)
        if not self.ownership.owns(session):
            return  # the node owning the session answers
        req = SessionDeleteRequest.model_validate_json(msg.data)
        if req.session != session:
            raise InferError(
                ErrorCode.BAD_REQUEST, f"a delete of {req.session!r} was sent for {session!r}"
            )
        runner = self._known(session)
        self.spawn(self._boundary(lambda m: self._answer_delete(m, runner), msg), "delete")

    async def _answer_delete(self, msg: Msg, runner: SessionRunner) -> None:
        await runner.delete()
        await self._retire(runner)
        await self.respond(msg, SessionDeleteReply(session=runner.session))

    async def _retire(self, runner: SessionRunner) -> None:
        """After a runner recorded its deletion: tombstone, then free engine state and records."""
        session = runner.session
        if self.runners.get(session) is not runner:
            return  # a second delete of the same session waited for the first
        # From here on the host answers gone (410) itself; the runner is no longer reachable.
        del self.runners[session]
        self._last_admit.pop(session, None)
        self.tombstones.add(session, time.time())
        await self._forget_engine(session)
        await self._purge_records(session)

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
        runner = SessionRunner(self.io, state, self.limits, self.inflight)
        self.runners[state.session] = runner
        return runner

    def held_bytes(self) -> int:
        """Bytes of messages the sessions served here hold (a session gone counts no more)."""
        return sum(r.state.recorded_bytes for r in self.runners.values())

    def inflight(self) -> int:
        """Turns running on this node now."""
        return sum(1 for r in self.runners.values() if r.turn is not None)

    # -- the engine and the record log, for the host only ---------------------------------
    async def _adopt(self, sessions: tuple[str, ...]) -> None:
        """Have the engine index what another node banked for sessions that moved here."""
        try:
            msg = await self.nc.request(
                self.subjects.engine_adopt(), encode(AdoptRequest(sessions=sessions)),
                timeout=ADOPT_TIMEOUT_S,
            )
            parse_reply(msg.data, msg.headers, AdoptReply)
        except Exception as e:  # their next turns recompute instead of restoring
            self.log.warning("adopt_failed", sessions=len(sessions), error=repr(e))

    async def _bank_flush(self, commits: dict[str, str], wait_s: float) -> BankFlushReply | None:
        """Have the engine make each session's last commit (``commits``: session → its
        token-prefix hash) durable before a hand-over; None if it did not answer (the taker
        recomputes what is missing)."""
        if not commits:
            return BankFlushReply(stored=0)
        try:
            msg = await self.nc.request(
                self.subjects.engine_bank_flush(),
                encode(BankFlushRequest(commits=commits, wait_s=wait_s)),
                timeout=wait_s + FLUSH_MARGIN_S,
            )
            reply: BankFlushReply = parse_reply(msg.data, msg.headers, BankFlushReply)
            return reply
        except Exception as e:
            self.log.warning("bank_flush_failed", sessions=len(commits), error=repr(e))
            return None

    async def _forget_engine(self, session: str) -> None:
        """Free a deleted session's slot and bank entries (stale bytes are only dead weight)."""
        try:
            msg = await self.nc.request(
                self.subjects.engine_forget(), encode(ForgetRequest(session=session)),
                timeout=FORGET_TIMEOUT_S,
            )
            parse_reply(msg.data, msg.headers, ForgetReply)
        except Exception as e:  # the bank keeps stale bytes until LRU; not worth failing
            self.log.warning("forget_failed", session=session, error=repr(e))

    async def _purge_records(self, session: str) -> None:
        """Drop a deleted session's records but the last, its delete: the durable tombstone."""
        try:
            await self.io.js.purge_stream(
                self.subjects.record_stream, subject=self.subjects.records(session), keep=1
            )
        except Exception as e:  # the records are dead weight, not a wrong state
            self.log.warning("purge_failed", session=session, error=repr(e))

    # -- heartbeat -------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        process = psutil.Process()
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.settings.heartbeat_s)
                return
            except TimeoutError:
                pass
            rss = await asyncio.to_thread(lambda: process.memory_info().rss)
            self.log.info(
                "stats_heartbeat", sessions=len(self.runners), inflight=self.inflight(),
                pending=sum(len(r.state.pending) for r in self.runners.values()),
                tombstones=len(self.tombstones), rss_bytes=rss, errors=self.errors,
                message_bytes=self.held_bytes(),
            )

    # -- rebuild ---------------------------------------------------------------------------
    async def _rebuild(self, partitions: frozenset[int]) -> list[SessionRunner]:
        if not partitions:
            return []
        found = await rebuild(  # sessions already served here are not rebuilt twice
            self.io.js, self.subjects,
            lambda s: self.ownership.partition(s) in partitions and s not in self.runners,
        )
        self.appender.learn(found.last_seq)
        for session, ts in found.deleted.items():
            self.tombstones.add(session, ts)
        rebuilt = []
        for state in found.states.values():
            if state.open_turn is not None:
                provisional, abort, taken = await close_interrupted(self.appender.append, state)
                if abort.reason == CRASHED:
                    await publish_set_aside(self.io, state, abort, taken)
                    self.log.warning("turn_set_aside", session=state.session,
                                     turn=abort.turn_id, cuts=CRASH_LIMIT)
                # A client saw the turn start on the node that died: it sees it end here.
                await publish_abort(self.io, state, provisional, abort.reason, "")
                self.log.info("interrupted_turn_recorded", session=state.session,
                              turn=abort.turn_id)
            rebuilt.append(self._runner(state))
        if found.states:
            self.log.info("sessions_rebuilt", sessions=len(found.states))
        return rebuilt


__all__ = ["RunnerHost"]
