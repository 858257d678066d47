"""The bus as a session runner sees it: ``RunnerIO``, and ``BusIO`` that speaks it over NATS.

A runner appends to its record log (through the node's ``RecordAppender``,
``actors/session/appender.py``, which holds the cluster's fencing rules), publishes its
events, asks the engine for a turn (and, while the result is late, whether the turn still
runs), cancels it, hands commits to the bank committer, relays answers and answers asks. It
reaches nothing else: what only the host does (engine clean-up after a deletion, adopting and
handing over sessions) is the host's.
"""
from __future__ import annotations

import asyncio
from typing import Protocol

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from pydantic import BaseModel

from actors.base import encode, error_headers, parse_reply
from actors.session.appender import RecordAppender
from actors.session.records import read_log
from actors.session.state import HistoryItem, SessionState, apply
from schemas.chat import ChatMessage
from schemas.errors import ErrorCode, InferError
from schemas.internal import (
    BankCommitRequest,
    CancelRequest,
    GenerateRequest,
    GenerateResult,
    TurnStatusReply,
    TurnStatusRequest,
)
from schemas.messages import PromptRequest
from schemas.records import Record, TurnParams
from schemas.subjects import (
    ABORTED_HEADER,
    MSG_ID_HEADER,
    EventKind,
    Subjects,
)

log = structlog.get_logger("session_runners")

LATE_RESULT_GRACE_S = 2.0
"""How long a result may still arrive after the engine said the turn no longer runs."""
PROBE_TIMEOUT_S = 5.0
"""Longest wait for the engine's answer to a turn-status probe."""
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
    """``RunnerIO`` over one NATS connection."""

    def __init__(
        self, nc: Client, subjects: Subjects, turn_timeout_s: float, probe_s: float,
        appender: RecordAppender,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.subjects = subjects
        self.turn_timeout_s = turn_timeout_s
        self.probe_s = probe_s
        """How often a turn waiting on the engine asks whether it still runs."""
        self.appender = appender
        self._banked: dict[str, str] = {}
        """Token-prefix hash of each session's last commit handed to the bank committer."""

    async def append(self, session: str, record: Record) -> None:
        """Append a record to the session's log, fenced (``RecordAppender.append``)."""
        await self.appender.append(session, record)

    def banked(self, sessions: list[str]) -> dict[str, str]:
        """Session → token-prefix hash of its last commit handed to the bank here."""
        return {s: self._banked[s] for s in sessions if self._banked.get(s)}

    def forget_banked(self, session: str) -> None:
        """Forget what was banked for a session this node no longer serves."""
        self._banked.pop(session, None)

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
        self._banked[session] = result.token_hash
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
