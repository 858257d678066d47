"""One session on the bus: prompts published durably, its events and record log read back,
and the node's structlog events watched (``tests/conftest.py``'s ``logs`` fixture)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from structlog.testing import capture_logs

from actors.session.records import read_log
from schemas.chat import ChatMessage
from schemas.messages import PromptRequest
from schemas.records import Record
from schemas.subjects import MSG_ID_HEADER, Subjects
from tests.helpers import EventCollector

S = Subjects()


def user(text: str) -> ChatMessage:
    """A user message."""
    return ChatMessage(role="user", content=text)


async def send(nc: Client, session: str, *texts: str, **fields: Any) -> str:
    """Publish a prompt durably; its idempotency key (accepted/error events carry it)."""
    key = uuid.uuid4().hex
    prompt = PromptRequest(messages=tuple(user(t) for t in texts), idempotency_key=key, **fields)
    await nc.jetstream().publish(
        S.prompt(session), prompt.model_dump_json().encode(), headers={MSG_ID_HEADER: key}
    )
    return key


async def records(nc: Client, session: str) -> list[Record]:
    """The session's record log, read as the node reads it."""
    return [r async for _, r in read_log(nc.jetstream(), S, session)]


class Session:
    """Every event of one session, decoded, with waits on them."""

    def __init__(self, collector: EventCollector) -> None:
        self.col = collector

    @classmethod
    async def watch(cls, nc: Client, session: str) -> Session:
        return cls(await EventCollector.start(nc, S.events_all(session)))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [json.loads(m.data) for m in self.col.messages if m.subject.endswith("." + kind)]

    def msgs(self, kind: str) -> list[Msg]:
        return [m for m in self.col.messages if m.subject.endswith("." + kind)]

    def kinds(self) -> list[str]:
        return [m.subject.rsplit(".", 1)[-1] for m in self.col.messages]

    async def until(self, pred: Callable[[Session], bool], timeout: float = 10.0) -> None:
        await self.col.wait_until(lambda _: pred(self), timeout)

    async def accepted(self, key: str) -> dict[str, Any]:
        """The accepted event of the prompt with idempotency key ``key``."""
        await self.until(lambda s: any(e["idempotency_key"] == key for e in s.of("accepted")))
        return next(e for e in self.of("accepted") if e["idempotency_key"] == key)

    async def error(self, key: str) -> dict[str, Any]:
        """The error event of the prompt with idempotency key ``key``."""
        await self.until(lambda s: any(e.get("idempotency_key") == key for e in s.of("error")))
        return next(e for e in self.of("error") if e.get("idempotency_key") == key)

    async def commits(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        await self.until(lambda s: len(s.of("commit")) >= n, timeout)
        return self.of("commit")

    async def aborted(self, n: int = 1) -> list[dict[str, Any]]:
        await self.until(lambda s: len(s.of("aborted")) >= n)
        return self.of("aborted")

    async def idle(self) -> dict[str, Any]:
        """Wait until the last status event says idle; that event."""
        await self.until(lambda s: bool(s.of("status")) and s.of("status")[-1]["state"] == "idle")
        return self.of("status")[-1]


class LogWatch:
    """A structlog processor that keeps every event and lets a test wait for one."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[None]]] = []
        self._loop = asyncio.get_running_loop()

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        entry = dict(event)
        self._loop.call_soon_threadsafe(self._add, entry)
        return event

    def _add(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        for pred, fut in self._waiters:
            if not fut.done() and pred(entry):
                fut.set_result(None)

    def named(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.entries if e.get("event") == name
                and all(e.get(k) == v for k, v in match.items())]

    async def wait(self, name: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The first ``name`` event whose fields include ``match``; fails after ``timeout``."""
        def pred(e: dict[str, Any]) -> bool:
            return e.get("event") == name and all(e.get(k) == v for k, v in match.items())

        if not self.named(name, **match):
            fut: asyncio.Future[None] = self._loop.create_future()
            self._waiters.append((pred, fut))
            try:
                await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise AssertionError(f"no {name} log {match} within {timeout:g} s") from None
        return self.named(name, **match)[0]


@contextmanager
def watching_logs() -> Iterator[LogWatch]:
    watch = LogWatch()
    with capture_logs(processors=[watch]):
        yield watch
