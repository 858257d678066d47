"""The bus as a session runner sees it: ``RunnerIO``, and ``BusIO`` that speaks it over NATS.

A runner appends to its record log, publishes its events, asks the engine for a turn (and,
while the result is late, whether the turn still runs), cancels it, hands commits to the bank
committer, relays answers and answers asks. It reaches nothing else: the host's registry is
the host's.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError
from pydantic import BaseModel

from actors.base import encode, error_headers, parse_reply
from actors.ownership import Ownership
from actors.session.records import read_log
from actors.session.state import HistoryItem, SessionState, apply
from schemas.chat import ChatMessage
from schemas.errors import ErrorCode, InferError
from schemas.internal import (
    AdoptReply,
    AdoptRequest,
    BankCommitRequest,
    BankFlushReply,
    BankFlushRequest,
    CancelRequest,
    ForgetReply,
    ForgetRequest,
    GenerateRequest,
    GenerateResult,
    TurnStatusReply,
    TurnStatusRequest,
)
from schemas.messages import PromptRequest
from schemas.records import Record, TurnParams
from schemas.subjects import (
    ABORTED_HEADER,
    EXPECTED_SUBJECT_SEQ_HEADER,
    MSG_ID_HEADER,
    NODE_HEADER,
    EventKind,
    Subjects,
)

log = structlog.get_logger("session_runners")

LATE_RESULT_GRACE_S = 2.0
"""How long a result may still arrive after the engine said the turn no longer runs."""
PROBE_TIMEOUT_S = 5.0
"""Longest wait for the engine's answer to a turn-status probe."""
FORGET_TIMEOUT_S = 5.0
"""Longest wait for the engine to drop a deleted session's state."""
ADOPT_TIMEOUT_S = 60.0
"""Longest wait for the engine to index the banked snapshots of sessions that moved here."""
FLUSH_MARGIN_S = 30.0
"""Extra time for the durable writes of a hand-over on top of the engine's slot wait."""
WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code for an expected-last-subject-sequence that does not hold."""
SERVICE_UNAVAILABLE = 503
"""JetStream's status while a stream has no leader: nothing stored, ask again."""
APPEND_TRIES = 4
APPEND_RETRY_S = 0.25
"""An append without an answer is sent again after 0.25, 0.5 and 1 s, then given up."""


def not_owned(session: str, why: str) -> InferError:
    """The error of an append this node may not make: the prompt stays for the owner."""
    return InferError(
        ErrorCode.UNAVAILABLE,
        f"this node no longer owns session {session} ({why}); the node that does answers it",
    )


def too_large_for_the_bus(size: int, max_payload: int) -> InferError:
    """The error of a turn whose conversation does not fit in one NATS message.

    Never ``unavailable``: no retry can make it fit, so a client must not retry it.
    """
    return InferError(
        ErrorCode.TOO_LARGE,
        f"this turn's conversation is {size} bytes, more than the {max_payload} bytes one "
        "NATS message carries (the server's max_payload); continue in a new session, "
        "delete this one, or raise the server's max_payload",
        {"bytes": size, "max_payload": max_payload},
    )


class RunnerIO(Protocol):
    """What a runner needs from outside itself: the bus, nothing else."""

    async def append(self, session: str, record: Record) -> None: ...
    async def event(
        self, session: str, kind: EventKind, model: BaseModel, aborted: bool = False
    ) -> None: ...
    async def generate(self, req: GenerateRequest) -> GenerateResult: ...
    async def cancel_engine(self, session: str, turn_id: str) -> None: ...
    async def bank_commit(
        self, session: str, turn_id: str, generation: int, result: GenerateResult
    ) -> None: ...
    async def relay(
        self, target: str, source: str, turn_id: str, text: str,
        params: TurnParams | None = None,
    ) -> None: ...
    async def answer(
        self, inbox: str, model: BaseModel, error: InferError | None = None
    ) -> None: ...
    def token_subject(self, session: str) -> str: ...
    async def history(self, session: str) -> list[HistoryItem]: ...


class BusIO:
    """``RunnerIO`` over one NATS connection, plus the clean-up after a session's deletion."""

    def __init__(
        self, nc: Client, subjects: Subjects, turn_timeout_s: float, probe_s: float,
        ownership: Ownership,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.subjects = subjects
        self.turn_timeout_s = turn_timeout_s
        self.probe_s = probe_s
        """How often a turn waiting on the engine asks whether it still runs."""
        self.ownership = ownership
        self.last_seq: dict[str, int] = {}
        """Stream sequence of each session's last record: the fence of its next append."""
        self.banked: dict[str, str] = {}
        """Token-prefix hash of each session's last commit handed to the bank committer."""

    async def append(self, session: str, record: Record) -> None:
        """Append a record to the session's durable log (returns once stored, exactly once).

        Fenced twice: this node appends only while its lease on the session's partition is
        valid by its own clock, and JetStream stores the record only if the session's last
        record is the one this node knows (``Nats-Expected-Last-Subject-Sequence``), so a
        node that lost the partition cannot write after the new owner did.

        An append whose answer is lost (a timeout, no responders, the connection gone) may
        or may not be stored; it is sent again, a few times over about two seconds. The same
        fence makes that safe: if the first copy was stored, the next is refused as stale,
        and the log's last record, carrying this record's id, says it is in. Still without
        an answer, the error is raised (the caller defers, and the record log may or may not
        hold the record); the session's next append then finds the log ahead of what this
        node knows and gives the partition up, so the session is rebuilt from the log rather
        than recording a prompt or a turn twice.
        """
        delay = APPEND_RETRY_S
        for attempt in range(APPEND_TRIES):
            if not self.ownership.valid(session):
                raise not_owned(session, "its partition's lease lapsed")
            headers = {
                MSG_ID_HEADER: record.id, NODE_HEADER: self.ownership.node,
                EXPECTED_SUBJECT_SEQ_HEADER: str(self.last_seq.get(session, 0)),
            }
            try:
                ack = await self.js.publish(
                    self.subjects.records(session), encode(record), headers=headers
                )
            except APIError as e:
                if e.err_code == WRONG_LAST_SEQUENCE:
                    stored = await self._resync(session, record.id)
                    if stored:
                        return
                    if stored is not None:
                        continue
                elif e.code != SERVICE_UNAVAILABLE or attempt == APPEND_TRIES - 1:
                    raise
            except Exception as e:  # the answer was lost: stored or not, it is asked again
                if attempt == APPEND_TRIES - 1:
                    raise
                log.warning("append_unconfirmed", session=session, record=record.id,
                            error=repr(e), retry_in_s=delay)
            else:
                self.last_seq[session] = ack.seq
                return
            await asyncio.sleep(delay)
            delay *= 2
        raise InferError(ErrorCode.UNAVAILABLE,
                         f"the record log of session {session} could not be read; retried")

    async def _resync(self, session: str, record_id: str) -> bool | None:
        """After an append refused as stale: True when the log's last record is this very
        record (an earlier copy was stored and its answer lost); False when the session's
        records are gone (the stream's age or size limit), so the append may be made again;
        None when the log could not be read now. When another node wrote last, or this node
        wrote a record its runner never heard was stored, the partition is given up
        (fenced): whoever owns it next rebuilds the session from the log."""
        try:
            last = await self.js.get_last_msg(
                self.subjects.record_stream, self.subjects.records(session)
            )
        except NotFoundError:
            self.last_seq[session] = 0
            return False
        except Exception as e:  # the log is unavailable now: the append is asked again
            log.warning("append_resync_failed", session=session, error=repr(e))
            return None
        headers = last.headers or {}
        if headers.get(MSG_ID_HEADER) == record_id:
            self.last_seq[session] = last.seq or 0
            return True
        why = ("another node wrote to it" if headers.get(NODE_HEADER) != self.ownership.node
               else "its log holds a record this node did not know was stored")
        log.warning("append_fenced", actor="session_runners", session=session, why=why)
        self.ownership.fenced(session)
        raise not_owned(session, why)

    async def event(
        self, session: str, kind: EventKind, model: BaseModel, aborted: bool = False
    ) -> None:
        """Publish a session event."""
        headers = {ABORTED_HEADER: "1"} if aborted else None
        await self.nc.publish(self.subjects.events(session, kind), encode(model), headers=headers)

    async def answer(
        self, inbox: str, model: BaseModel, error: InferError | None = None
    ) -> None:
        """Publish an ask's answer (or its typed error) to the requester's inbox."""
        headers = error_headers(error) if error is not None else None
        await self.nc.publish(inbox, encode(model), headers=headers)

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        """Ask the engine for a turn and wait for its result.

        A result published while this connection reconnects is lost for good, and the turn
        would wait out ``turn_timeout_s``. So every ``probe_s`` the runner asks the engine
        whether the turn still runs; when it does not and no result came, the turn fails
        as unavailable (its prompts stay recorded) instead of hanging.
        """
        data = encode(req)
        if len(data) > self.nc.max_payload:
            raise too_large_for_the_bus(len(data), self.nc.max_payload)
        request = asyncio.ensure_future(self.nc.request(
            self.subjects.engine_generate(), data, timeout=self.turn_timeout_s
        ))
        try:
            await self._await_result(req, request)
            reply = request.result()
        except (InferError, asyncio.CancelledError):
            raise
        except MaxPayloadError as e:  # the server's limit is lower than the one it announced
            raise too_large_for_the_bus(len(data), self.nc.max_payload) from e
        except Exception as e:
            raise InferError(ErrorCode.UNAVAILABLE, f"no engine answered: {e!r}") from e
        finally:
            if not request.done():
                request.cancel()
        return parse_reply(reply.data, reply.headers, GenerateResult)

    async def _await_result(self, req: GenerateRequest, request: asyncio.Future[Msg]) -> None:
        while True:
            done, _ = await asyncio.wait({request}, timeout=self.probe_s)
            if done:
                return
            if await self._engine_runs(req):
                continue
            # Not running: give a result already on its way a moment to arrive.
            grace = min(self.probe_s, LATE_RESULT_GRACE_S)
            done, _ = await asyncio.wait({request}, timeout=grace)
            if done:
                return
            raise InferError(
                ErrorCode.UNAVAILABLE,
                "the engine finished this turn but its result was lost (NATS reconnected "
                "meanwhile); the prompt is kept and the turn runs again",
            )

    async def _engine_runs(self, req: GenerateRequest) -> bool:
        """True unless the engine answers that the turn is not running."""
        probe = TurnStatusRequest(session=req.session, turn_id=req.turn_id)
        try:
            msg = await self.nc.request(
                self.subjects.engine_turn_status(), encode(probe),
                timeout=min(self.probe_s, PROBE_TIMEOUT_S),
            )
            status: TurnStatusReply = parse_reply(msg.data, msg.headers, TurnStatusReply)
        except Exception:  # no answer is no evidence: keep waiting for the result
            return True
        return status.running

    async def cancel_engine(self, session: str, turn_id: str) -> None:
        """Tell the engine to stop a turn."""
        cancel = CancelRequest(session=session, turn_id=turn_id)
        await self.nc.publish(self.subjects.engine_cancel(session), encode(cancel))

    async def bank_commit(
        self, session: str, turn_id: str, generation: int, result: GenerateResult
    ) -> None:
        """Hand the committed turn to the bank committer (fire and forget)."""
        self.banked[session] = result.token_hash
        await self.nc.publish(self.subjects.bank_commit(), encode(BankCommitRequest(
            session=session, turn_id=turn_id, generation=generation, n_tokens=result.n_tokens,
            token_hash=result.token_hash,
        )))

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
            relay_from=source, sampling=given.sampling, stop=given.stop,
            max_tokens=given.max_tokens,
        )
        await self.js.publish(
            self.subjects.prompt(target), encode(prompt), headers={MSG_ID_HEADER: key}
        )

    async def history(self, session: str) -> list[HistoryItem]:
        """The whole committed history of ``session``, replayed from its record log (what a
        runner's state no longer holds before its window included)."""
        state = SessionState(session, keep_history=True)
        async for _, record in read_log(self.js, self.subjects, session):
            apply(state, record)
        return state.history

    def token_subject(self, session: str) -> str:
        """Where the engine publishes this session's tokens."""
        return self.subjects.events(session, EventKind.TOKEN)

    async def adopt(self, sessions: tuple[str, ...]) -> None:
        """Have the engine index what another node banked for sessions that moved here."""
        try:
            msg = await self.nc.request(
                self.subjects.engine_adopt(), encode(AdoptRequest(sessions=sessions)),
                timeout=ADOPT_TIMEOUT_S,
            )
            parse_reply(msg.data, msg.headers, AdoptReply)
        except Exception as e:  # their next turns recompute instead of restoring
            log.warning("adopt_failed", actor="session_runners", sessions=len(sessions),
                        error=repr(e))

    async def bank_flush(self, sessions: list[str], wait_s: float) -> BankFlushReply | None:
        """Have the engine make each session's last commit durable (before a hand-over);
        None if it did not answer (the taker recomputes what is missing)."""
        commits = {s: self.banked[s] for s in sessions if self.banked.get(s)}
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
            log.warning("bank_flush_failed", actor="session_runners", sessions=len(commits),
                        error=repr(e))
            return None

    async def forget(self, session: str) -> None:
        """Free a deleted session's slot and bank entries (stale bytes are only dead weight)."""
        try:
            msg = await self.nc.request(
                self.subjects.engine_forget(), encode(ForgetRequest(session=session)),
                timeout=FORGET_TIMEOUT_S,
            )
            parse_reply(msg.data, msg.headers, ForgetReply)
        except Exception as e:  # the bank keeps stale bytes until LRU; not worth failing
            log.warning("forget_failed", actor="session_runners", session=session, error=repr(e))

    async def purge_records(self, session: str) -> None:
        """Drop a deleted session's records but the last, its delete: the durable tombstone."""
        try:
            await self.js.purge_stream(
                self.subjects.record_stream, subject=self.subjects.records(session), keep=1
            )
        except Exception as e:  # the records are dead weight, not a wrong state
            log.warning("purge_failed", actor="session_runners", session=session, error=repr(e))
