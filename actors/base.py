"""The actor base: a NATS connection, subscriptions as mailboxes, one error boundary.

A nats-py subscription hands its callback one message at a time from a bounded queue: that
queue is the actor's mailbox and its backpressure. Every handler runs inside ``_boundary``,
so no exception escapes into nats-py (which would send it to ``error_cb``, where it
vanishes): an ``InferError`` becomes a typed error reply, anything else a counted 500.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ValidationError

from schemas.errors import STATUS, ErrorCode, InferError
from schemas.messages import ErrorEvent
from schemas.subjects import (
    ERROR_HEADER,
    SERVICE_ERROR_CODE_HEADER,
    SERVICE_ERROR_HEADER,
    Subjects,
)

Handler = Callable[[Msg], Awaitable[None]]


async def wait_any(timeout: float, *events: asyncio.Event) -> None:
    """Return after ``timeout`` seconds, or as soon as one of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def encode(model: BaseModel) -> bytes:
    """Wire form of a message."""
    return model.model_dump_json(exclude_none=False).encode()


def error_event(err: InferError, session: str | None = None, **extra: Any) -> ErrorEvent:
    """The event form of an error."""
    return ErrorEvent(
        session=session,
        code=err.code,
        status=err.status,
        message=err.message,
        details=err.details,
        **extra,
    )


def error_headers(err: InferError) -> dict[str, str]:
    """Headers of an error reply: infernode's code, and NATS micro's pair that tools show."""
    return {
        ERROR_HEADER: err.code.value,
        SERVICE_ERROR_CODE_HEADER: str(err.status),
        # A header value is one line.
        SERVICE_ERROR_HEADER: " ".join(err.message.split())[:1024],
    }


def validation_sentence(e: ValidationError) -> str:
    """One readable sentence from a pydantic error."""
    parts = []
    for err in e.errors()[:3]:
        where = ".".join(str(x) for x in err.get("loc", ())) or "message"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = f" (and {e.error_count() - 3} more)" if e.error_count() > 3 else ""
    return "; ".join(parts) + more


class Actor:
    """Base of every actor: ``start()``, ``stop()`` that drains, ``async with``."""

    name = "actor"

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self.nc = nc
        self.subjects = subjects
        self.log = structlog.get_logger(self.name).bind(actor=self.name)
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.errors = 0

    async def start(self) -> None:
        """Subscribe; subclasses call ``subscribe`` here."""

    async def stop(self) -> None:
        """Drain subscriptions (finish queued messages), then wait for spawned tasks."""
        for sub in self._subs:
            try:
                await sub.drain()
            except Exception as e:  # a closed connection has nothing left to drain
                self.log.debug("drain_failed", error=str(e))
        self._subs.clear()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def __aenter__(self) -> Actor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def subscribe(
        self, subject: str, handler: Handler, queue: str = "", pending_msgs_limit: int = 65536
    ) -> Subscription:
        """Subscribe ``handler`` behind the error boundary."""

        async def cb(msg: Msg) -> None:
            await self._boundary(handler, msg)

        sub = await self.nc.subscribe(
            subject, queue=queue, cb=cb, pending_msgs_limit=pending_msgs_limit
        )
        self._subs.append(sub)
        return sub

    def spawn(self, coro: Awaitable[None], what: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task the actor waits for on stop; its errors are logged."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.errors += 1
                self.log.exception("task_failed", task=what, error=str(e))

        task = asyncio.get_running_loop().create_task(guarded(), name=f"{self.name}:{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _boundary(self, handler: Handler, msg: Msg) -> None:
        try:
            await handler(msg)
        except InferError as e:
            await self.reply_error(msg, e)
        except ValidationError as e:
            await self.reply_error(msg, InferError(ErrorCode.BAD_REQUEST, validation_sentence(e)))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.errors += 1
            self.log.exception("handler_failed", subject=msg.subject, error=str(e))
            await self.reply_error(
                msg, InferError(ErrorCode.INTERNAL, f"internal error in {self.name}: {e}")
            )

    async def reply_error(self, msg: Msg, err: InferError, session: str | None = None) -> None:
        """Answer a request with an error event (header ``Infer-Error: <code>``)."""
        if not msg.reply:
            return
        headers = error_headers(err)
        try:
            await self.nc.publish(
                msg.reply, encode(error_event(err, session)), headers=headers
            )
        except Exception as e:  # the requester may be gone; nothing else to tell
            self.log.debug("reply_failed", error=str(e))

    async def respond(self, msg: Msg, model: BaseModel) -> None:
        """Answer a request."""
        if msg.reply:
            await self.nc.publish(msg.reply, encode(model))

    async def publish(
        self, subject: str, model: BaseModel, headers: dict[str, str] | None = None
    ) -> None:
        """Publish a message."""
        await self.nc.publish(subject, encode(model), headers=headers)


def parse_reply(data: bytes, headers: dict[str, str] | None, model: type[BaseModel]) -> Any:
    """Decode a reply: raises the ``InferError`` carried by an error reply."""
    if headers and ERROR_HEADER in headers:
        event = ErrorEvent.model_validate_json(data)
        raise InferError(event.code, event.message, event.details)
    return model.model_validate_json(data)


__all__ = [
    "Actor", "STATUS", "encode", "error_event", "error_headers", "parse_reply",
    "validation_sentence", "wait_any",
]
