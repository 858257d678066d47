"""One turn as the gateway sees it over NATS: publish the prompt durably, follow its events.

The gateway is a client like any agent: the prompt goes into the intake stream and the
answer is read from ``<prefix>.events.<session>.*``. The events subscription is made before
the publish (one connection keeps order), so no event of the turn can be missed. The events
are read by the one ``TurnFollower`` (``actors/turn_follower.py``) the client library uses
too: a turn the node runs again by itself (it restarted, the bus lost the result) is
followed into its rerun, so the HTTP client gets the rerun's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError
from pydantic import BaseModel

from actors.turn_follower import TurnAborted, TurnEvent, TurnFollower, read_event
from schemas.errors import ErrorCode, InferError
from schemas.messages import (
    AbortedEvent,
    AbortRequest,
    AcceptedEvent,
    PromptProgressEvent,
    PromptRequest,
)
from schemas.subjects import MSG_ID_HEADER, Subjects

_QUEUE_LIMIT = 65_536
"""Events one turn may have waiting (a client that reads slower than the model writes)."""


TurnAbortedError = TurnAborted
"""The turn was aborted (by a client, an operator, a deletion) and is not run again."""


class DuplicatePromptError(Exception):
    """JetStream had already stored this idempotency key: another request carries it."""


@dataclass
class NodeTurn:
    """The events of the turn that answers one prompt."""

    nc: Client
    subjects: Subjects
    session: str
    prompt: PromptRequest
    timeout: float
    follower: TurnFollower = field(init=False)
    """Where the turn stands, read from the session's events."""
    _queue: asyncio.Queue[BaseModel] = field(default_factory=lambda: asyncio.Queue(_QUEUE_LIMIT))
    _sub: Subscription | None = None
    _deadline: float = 0.0

    def __post_init__(self) -> None:
        self.follower = TurnFollower(self.key)

    @property
    def key(self) -> str:
        """The prompt's idempotency key."""
        assert self.prompt.idempotency_key is not None
        return self.prompt.idempotency_key

    async def start(self) -> AcceptedEvent:
        """Publish the prompt and wait until the session recorded it (or refused it)."""
        self._deadline = asyncio.get_running_loop().time() + self.timeout
        self._sub = await self.nc.subscribe(
            self.subjects.events_all(self.session), cb=self._on_event
        )
        try:
            ack = await self.nc.jetstream().publish(
                self.subjects.prompt(self.session), self.prompt.model_dump_json().encode(),
                headers={MSG_ID_HEADER: self.key}, timeout=min(self.timeout, 10.0),
            )
        except APIError as e:
            raise InferError(
                ErrorCode.BUSY, f"the node's intake refused the prompt ({e.description}); "
                "retry shortly", {"retry_after_s": 1},
            ) from e
        except (NoRespondersError, NoStreamResponseError, NatsTimeoutError, TimeoutError) as e:
            raise InferError(
                ErrorCode.UNAVAILABLE, "no node took the prompt; is `infernode up` running "
                "against this NATS server?",
            ) from e
        if ack.duplicate:
            raise DuplicatePromptError(self.key)
        while True:
            event = await self._next()
            self.follower.step(event)  # raises the prompt's error
            if self.follower.accepted:
                assert isinstance(event, AcceptedEvent)
                return event

    async def events(self, progress: bool = False) -> AsyncIterator[TurnEvent]:
        """Tokens and tool-call deltas, then done, then commit; raises on an error or an
        abort the node does not rerun (a rerun is followed: its events come next). With
        ``progress``, a long prefill's ``prompt_progress`` events come first."""
        while self.follower.commit is None:
            event = self.follower.step(await self._next())
            if event is None or isinstance(event, AbortedEvent):
                continue
            if isinstance(event, PromptProgressEvent) and not progress:
                continue
            yield event

    async def abort(self, reason: str) -> None:
        """Ask the node to stop this session's running turn (best effort)."""
        body = AbortRequest(reason=reason).model_dump_json().encode()
        try:
            await self.nc.request(self.subjects.abort(self.session), body, timeout=5.0)
        except Exception:  # the node may be gone; the turn then ends on its own
            return

    async def close(self) -> None:
        """Stop listening."""
        if self._sub is not None:
            with contextlib.suppress(Exception):  # a closed connection: nothing to undo
                await self._sub.unsubscribe()
            self._sub = None

    async def _next(self) -> BaseModel:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # lands as an event arrives, and a client gone mid-answer would not abort the turn.
        try:
            async with asyncio.timeout_at(self._deadline):
                return await self._queue.get()
        except TimeoutError:
            raise InferError(
                ErrorCode.UNAVAILABLE,
                f"the node did not finish the turn within {self.timeout:g} s",
                {"retry_after_s": 5},
            ) from None

    async def _on_event(self, msg: Msg) -> None:
        event = read_event(self.subjects.event_kind(msg.subject), msg.data)
        if event is None:  # not about a turn, or another node version's event
            return
        if self._queue.full():  # a stalled reader; the turn fails rather than grows memory
            return
        self._queue.put_nowait(event)
