"""Python client: publish prompts, stream a turn's tokens, abort, read history.

    async with InfernodeClient("nats://127.0.0.1:4222") as c:
        async for chunk in c.prompt("my-session", "Hello"):
            print(chunk.text, end="")
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel

from node.bus import connect
from node.config import NodeConfig
from schemas.admin import (
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
    CommitEvent,
    DoneEvent,
    ErrorEvent,
    PromptRequest,
    StartedEvent,
    TokenEvent,
)
from schemas.subjects import ERROR_HEADER, MSG_ID_HEADER, AdminVerb, Subjects, is_session_id

M = TypeVar("M", bound=BaseModel)

_EVENT_TYPES: dict[str, type[BaseModel]] = {
    "accepted": AcceptedEvent,
    "started": StartedEvent,
    "token": TokenEvent,
    "done": DoneEvent,
    "commit": CommitEvent,
    "aborted": AbortedEvent,
    "error": ErrorEvent,
}


class TurnAborted(Exception):
    """The turn answering the prompt was aborted."""

    def __init__(self, event: AbortedEvent) -> None:
        super().__init__(f"turn {event.turn_id} was aborted ({event.reason})")
        self.event = event


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
    ) -> None:
        """``config`` carries NATS credentials and TLS; ``nc`` reuses an open connection."""
        self.url = url
        self.subjects = Subjects(prefix)
        self.config = config or NodeConfig()
        self.connect_timeout = connect_timeout
        self._nc = nc
        self._own = nc is None

    async def __aenter__(self) -> InfernodeClient:
        if self._nc is None:
            self._nc = await connect(
                self.config, self.url, "infernode-client", timeout=self.connect_timeout
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

    async def send(self, session: str, prompt: PromptRequest) -> str:
        """Publish a prompt durably; returns its idempotency key."""
        if not is_session_id(session):
            raise InferError(
                ErrorCode.BAD_REQUEST,
                f"session id {session!r} is not valid: use 1-128 letters, digits, '_' or '-'",
            )
        key = prompt.idempotency_key or uuid.uuid4().hex
        if prompt.idempotency_key is None:
            prompt = prompt.model_copy(update={"idempotency_key": key})
        js = self.nc.jetstream()
        await js.publish(
            self.subjects.prompt(session),
            prompt.model_dump_json().encode(),
            headers={MSG_ID_HEADER: key},
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
        timeout: float = 600.0,
        result: TurnResult | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Send a prompt and yield the tokens of the turn that answers it.

        Raises ``InferError`` on an error event and ``TurnAborted`` if the turn is aborted.
        Pass ``result`` to receive the done and commit events.
        """
        messages = (
            (ChatMessage(role="user", content=text),) if isinstance(text, str) else tuple(text)
        )
        prompt = PromptRequest(
            messages=messages, sampling=sampling or SamplingParams(), max_tokens=max_tokens,
            stop=tuple(stop), expect_generation=expect_generation, relay_to=relay_to,
            idempotency_key=uuid.uuid4().hex,
        )
        out = result if result is not None else TurnResult()
        queue: asyncio.Queue[tuple[str, BaseModel]] = asyncio.Queue()

        async def on_event(msg: Msg) -> None:
            _, kind = self.subjects.event_of(msg.subject)
            model = _EVENT_TYPES.get(kind)
            if model is not None:
                queue.put_nowait((kind, model.model_validate_json(msg.data)))

        sub = await self.nc.subscribe(self.subjects.events_all(session), cb=on_event)
        try:
            await self.send(session, prompt)
            async for token in _follow(queue, prompt.idempotency_key or "", out, timeout):
                yield token
        finally:
            await sub.unsubscribe()

    async def ask(self, session: str, text: str, **kw: object) -> TurnResult:
        """Send a prompt and wait for the committed answer."""
        result = TurnResult()
        async for _ in self.prompt(session, text, result=result, **kw):  # type: ignore[arg-type]
            pass
        return result

    async def abort(self, session: str, reason: str = "client", timeout: float = 30.0) -> AbortReply:
        """Abort the running turn of ``session``."""
        msg = await self.nc.request(
            self.subjects.abort(session), AbortRequest(reason=reason).model_dump_json().encode(),
            timeout=timeout,
        )
        if msg.headers and ERROR_HEADER in msg.headers:
            event = ErrorEvent.model_validate_json(msg.data)
            raise InferError(event.code, event.message, event.details)
        return AbortReply.model_validate_json(msg.data)


    async def _admin(self, verb: AdminVerb, body: bytes, model: type[M], timeout: float) -> M:
        msg = await self.nc.request(self.subjects.admin(verb), body, timeout=timeout)
        if msg.headers and ERROR_HEADER in msg.headers:
            event = ErrorEvent.model_validate_json(msg.data)
            raise InferError(event.code, event.message, event.details)
        return model.model_validate_json(msg.data)

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
        msg = await self.nc.request(self.subjects.admin(AdminVerb.DELETE), body, timeout=timeout)
        if msg.headers and ERROR_HEADER in msg.headers:
            event = ErrorEvent.model_validate_json(msg.data)
            raise InferError(event.code, event.message, event.details)


async def _follow(
    queue: asyncio.Queue[tuple[str, BaseModel]], key: str, out: TurnResult, timeout: float
) -> AsyncIterator[TokenEvent]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while out.commit is None:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"no committed answer within {timeout:.0f} s")
        kind, event = await asyncio.wait_for(queue.get(), remaining)
        if isinstance(event, AcceptedEvent) and event.idempotency_key == key:
            out.message_ids = event.message_ids
        elif isinstance(event, ErrorEvent) and (
            event.idempotency_key == key or (event.turn_id and event.turn_id == out.turn_id)
        ):
            raise InferError(event.code, event.message, event.details)
        elif isinstance(event, StartedEvent) and set(out.message_ids) & set(event.parent_ids):
            out.turn_id = event.turn_id
        elif out.turn_id is None:
            continue
        elif isinstance(event, TokenEvent) and event.turn_id == out.turn_id:
            out.tokens.append(event)
            out.text += event.text
            yield event
        elif isinstance(event, DoneEvent) and event.turn_id == out.turn_id:
            out.done = event
        elif isinstance(event, CommitEvent) and event.turn_id == out.turn_id:
            out.commit = event
        elif isinstance(event, AbortedEvent) and event.turn_id == out.turn_id:
            raise TurnAborted(event)
