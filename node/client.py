"""Python client: publish prompts, stream a turn's tokens, ask for answers, abort, read history.

    async with InfernodeClient("nats://127.0.0.1:4222") as c:
        async for chunk in c.prompt("my-session", "Hello"):
            print(chunk.text, end="")
        answer = await c.ask("my-session", "And now?")
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel

from actors.turn_follower import TurnAborted, TurnFollower, read_event
from node.bus import connect
from node.config import NodeConfig
from node.local_auth import client_config
from schemas.admin import (
    DeleteReply,
    HealthReply,
    HistoryReply,
    MetricsReply,
    SessionRequest,
    SessionsReply,
)
from schemas.chat import ChatMessage, SamplingParams
from schemas.errors import ErrorCode, InferError
from schemas.messages import (
    AbortedEvent,
    AbortReply,
    AbortRequest,
    AcceptedEvent,
    AnswerReply,
    CommitEvent,
    DoneEvent,
    ErrorEvent,
    PromptRequest,
    TokenEvent,
)
from schemas.subjects import (
    ERROR_HEADER,
    MSG_ID_HEADER,
    AdminVerb,
    EventKind,
    Subjects,
    is_session_id,
)

M = TypeVar("M", bound=BaseModel)

__all__ = ["InfernodeClient", "TurnAborted", "TurnResult", "read_reply"]


@dataclass
class TurnResult:
    """Everything the events of one turn said."""

    message_ids: tuple[str, ...] = ()
    turn_id: str | None = None
    text: str = ""
    done: DoneEvent | None = None
    commit: CommitEvent | None = None
    tokens: list[TokenEvent] = field(default_factory=list)


class InfernodeClient:
    """A connection to a node's subjects."""

    def __init__(
        self,
        url: str,
        prefix: str = "infer",
        nc: Client | None = None,
        config: NodeConfig | None = None,
        connect_timeout: float = 5.0,
        fail_fast: bool = False,
    ) -> None:
        """``config`` carries NATS credentials and TLS; ``nc`` reuses an open connection.

        ``fail_fast`` gives up the first connect as soon as every address refused it.
        """
        self.url = url
        self.subjects = Subjects(prefix)
        self.config = config or NodeConfig()
        self.connect_timeout = connect_timeout
        self.fail_fast = fail_fast
        self._nc = nc
        self._own = nc is None

    async def __aenter__(self) -> InfernodeClient:
        if self._nc is None:
            # The local `infernode up`'s client user, when this is its server.
            self._nc = await connect(
                client_config(self.config, self.url), self.url, "infernode-client",
                timeout=self.connect_timeout, fail_fast=self.fail_fast,
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._own and self._nc is not None:
            await self._nc.drain()

    @property
    def nc(self) -> Client:
        """The NATS connection."""
        assert self._nc is not None, "use `async with InfernodeClient(...)`"
        return self._nc

    async def send(
        self, session: str, prompt: PromptRequest, extra: Mapping[str, Any] | None = None
    ) -> str:
        """Publish a prompt durably; returns its idempotency key.

        ``extra`` adds fields to the body as given (the node validates them).
        """
        _check_session(session)
        key = prompt.idempotency_key or uuid.uuid4().hex
        if prompt.idempotency_key is None:
            prompt = prompt.model_copy(update={"idempotency_key": key})
        js = self.nc.jetstream()
        await js.publish(
            self.subjects.prompt(session), _body(prompt, extra),
            # Session and key: unique even on a stream that de-duplicates across sessions.
            headers={MSG_ID_HEADER: f"{session}:{key}"},
        )
        return key

    async def prompt(
        self,
        session: str,
        text: str | Sequence[ChatMessage],
        *,
        sampling: SamplingParams | None = None,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        expect_generation: int | None = None,
        relay_to: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        accept_relays_from: Sequence[str] | None = None,
        timeout: float = 600.0,
        result: TurnResult | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Send a prompt and yield the tokens of the turn that answers it.

        ``tools``, ``tool_choice`` and ``response_format`` take OpenAI's shapes. Raises
        ``InferError`` on an error event and ``TurnAborted`` if the turn is aborted. A turn
        the node cut and runs again by itself (``RERUN_REASONS``: the bus lost its result,
        the node stopped) is followed: its tokens so far are yielded, then the rerun's.
        Pass ``result`` to receive the done and commit events.
        """
        prompt = PromptRequest(
            messages=_messages(text), sampling=sampling or SamplingParams(),
            max_tokens=max_tokens, stop=tuple(stop), expect_generation=expect_generation,
            relay_to=relay_to, idempotency_key=uuid.uuid4().hex,
            accept_relays_from=None if accept_relays_from is None else tuple(accept_relays_from),
        )
        extra = _openai_extra(tools, tool_choice, response_format)
        out = result if result is not None else TurnResult()
        queue = _EventQueue(self.subjects)
        sub = await self.nc.subscribe(self.subjects.events_all(session), cb=queue.on_event)
        try:
            await self.send(session, prompt, extra)
            async for token in _follow(queue, prompt.idempotency_key or "", out, timeout):
                yield token
        finally:
            await sub.unsubscribe()

    async def accept_relays(
        self, session: str, sources: Sequence[str], timeout: float = 30.0
    ) -> AcceptedEvent:
        """Let ``session`` accept relayed answers from ``sources`` (replaces its last grant).

        Returns once the grant is recorded: a relay published after it is let in.
        """
        prompt = PromptRequest(
            accept_relays_from=tuple(sources), reply=False, idempotency_key=uuid.uuid4().hex
        )
        queue = _EventQueue(self.subjects)
        subs = [
            await self.nc.subscribe(self.subjects.events(session, kind), cb=queue.on_event)
            for kind in (EventKind.ACCEPTED, EventKind.ERROR)
        ]
        try:
            await self.send(session, prompt)
            while True:
                event = await asyncio.wait_for(queue.get(), timeout)
                if getattr(event, "idempotency_key", None) != prompt.idempotency_key:
                    continue
                if isinstance(event, ErrorEvent):
                    raise InferError(event.code, event.message, event.details)
                assert isinstance(event, AcceptedEvent)
                return event
        finally:
            for sub in subs:
                await sub.unsubscribe()

    async def complete(self, session: str, text: str, **kw: Any) -> TurnResult:
        """Send a prompt, follow its events, and return them once the turn is committed."""
        result = TurnResult()
        async for _ in self.prompt(session, text, result=result, **kw):
            pass
        return result

    async def ask(
        self,
        session: str,
        text: str | Sequence[ChatMessage],
        *,
        sampling: SamplingParams | None = None,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        expect_generation: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float = 600.0,
    ) -> AnswerReply:
        """One request, one answer, on ``<prefix>.ask.<session>``: the turn's final answer.

        Durable like a prompt: a node restarted mid-turn still answers. Raises ``InferError``
        when the ask is refused or the turn fails. An aborted turn is an answer whose
        ``finish_reason`` is ``aborted``.
        """
        _check_session(session)
        prompt = PromptRequest(
            messages=_messages(text), sampling=sampling or SamplingParams(),
            max_tokens=max_tokens, stop=tuple(stop), expect_generation=expect_generation,
            idempotency_key=idempotency_key or uuid.uuid4().hex,
        )
        body = _body(prompt, _openai_extra(tools, tool_choice, response_format))
        msg = await self.nc.request(self.subjects.ask(session), body, timeout=timeout)
        return read_reply(msg, AnswerReply)

    async def abort(
        self, session: str, reason: str = "client", timeout: float = 30.0
    ) -> AbortReply:
        """Abort the running turn of ``session``."""
        msg = await self.nc.request(
            self.subjects.abort(session), AbortRequest(reason=reason).model_dump_json().encode(),
            timeout=timeout,
        )
        return read_reply(msg, AbortReply)

    async def _admin(self, verb: AdminVerb, body: bytes, model: type[M], timeout: float) -> M:
        msg = await self.nc.request(self.subjects.admin(verb), body, timeout=timeout)
        return read_reply(msg, model)

    async def history(self, session: str, timeout: float = 10.0) -> HistoryReply:
        """The record log of ``session``: user, committed and ABORTED turns."""
        body = SessionRequest(session=session).model_dump_json().encode()
        return await self._admin(AdminVerb.SESSION, body, HistoryReply, timeout)

    async def sessions(self, timeout: float = 10.0) -> SessionsReply:
        """Every session of the node."""
        return await self._admin(AdminVerb.SESSIONS, b"{}", SessionsReply, timeout)

    async def health(self, timeout: float = 10.0) -> HealthReply:
        """Health of the node."""
        return await self._admin(AdminVerb.HEALTH, b"{}", HealthReply, timeout)

    async def metrics(self, timeout: float = 10.0) -> MetricsReply:
        """Counters of the node."""
        return await self._admin(AdminVerb.METRICS, b"{}", MetricsReply, timeout)

    async def delete(self, session: str, timeout: float = 60.0) -> None:
        """Delete ``session`` (after its in-flight commit)."""
        body = SessionRequest(session=session).model_dump_json().encode()
        await self._admin(AdminVerb.DELETE, body, DeleteReply, timeout)


def read_reply(msg: Msg, model: type[M]) -> M:
    """A reply's model; an error reply raises its ``InferError``."""
    if msg.headers and ERROR_HEADER in msg.headers:
        event = ErrorEvent.model_validate_json(msg.data)
        raise InferError(event.code, event.message, event.details)
    return model.model_validate_json(msg.data)


def _check_session(session: str) -> None:
    if not is_session_id(session):
        raise InferError(
            ErrorCode.BAD_REQUEST,
            f"session id {session!r} is not valid: use 1-128 letters, digits, '_' or '-'",
        )


def _messages(text: str | Sequence[ChatMessage]) -> tuple[ChatMessage, ...]:
    return (ChatMessage(role="user", content=text),) if isinstance(text, str) else tuple(text)


def _openai_extra(
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: str | Mapping[str, Any] | None,
    response_format: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The OpenAI fields given, as they go on the wire."""
    given = {"tools": tools, "tool_choice": tool_choice, "response_format": response_format}
    return {k: (list(v) if k == "tools" else v) for k, v in given.items() if v is not None}


def _body(prompt: PromptRequest, extra: Mapping[str, Any] | None) -> bytes:
    if not extra:
        return prompt.model_dump_json().encode()
    return json.dumps({**prompt.model_dump(mode="json"), **extra}).encode()


class _EventQueue(asyncio.Queue[BaseModel]):
    """A session's events, read as the turn follower reads them, in arrival order."""

    def __init__(self, subjects: Subjects) -> None:
        super().__init__()
        self.subjects = subjects

    async def on_event(self, msg: Msg) -> None:
        """A subscription's callback: queue the event if it is one a follower reads."""
        event = read_event(self.subjects.event_kind(msg.subject), msg.data)
        if event is not None:
            self.put_nowait(event)


async def _follow(
    queue: asyncio.Queue[BaseModel], key: str, out: TurnResult, timeout: float
) -> AsyncIterator[TokenEvent]:
    """The turn's tokens (a rerun's after the cut turn's); ``out`` takes in what it said."""
    follower = TurnFollower(key)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while out.commit is None:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"no committed answer within {timeout:.0f} s")
        event = follower.step(await asyncio.wait_for(queue.get(), remaining))
        out.message_ids, out.turn_id = follower.message_ids, follower.turn_id
        if isinstance(event, TokenEvent):
            out.tokens.append(event)
            out.text += event.text
            yield event
        elif isinstance(event, DoneEvent):
            out.done = event
        elif isinstance(event, CommitEvent):
            out.commit = event
        elif isinstance(event, AbortedEvent):  # run again by the node: its rerun follows
            out.text, out.tokens = "", []
