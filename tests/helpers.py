"""Test helpers that wait on signals with deadlines, never by sleeping."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas.chat import ChatMessage, SamplingParams
from schemas.messages import PromptRequest
from schemas.subjects import MSG_ID_HEADER, Subjects


async def until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Yield to other tasks until ``pred()`` holds, failing after ``timeout`` s.

    For state that changes only when another task on this loop runs (a coroutine reaching a
    queue), where there is no event to wait on; it never sleeps for a fixed time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        await asyncio.sleep(0)


async def wait_for_event(event: asyncio.Event, timeout: float = 10.0, what: str = "event") -> None:
    """Wait until ``event`` is set, failing the test with ``what`` after ``timeout`` s."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        raise AssertionError(f"{what} did not happen within {timeout:g} s") from None


class EventCollector:
    """Collects every message on a subject; tests wait until the list satisfies a predicate."""

    def __init__(self, nc: Client, subject: str) -> None:
        self.nc = nc
        self.subject = subject
        self.messages: list[Msg] = []
        self._changed = asyncio.Condition()
        self._sub: Subscription | None = None

    @classmethod
    async def start(cls, nc: Client, subject: str) -> EventCollector:
        """Subscribe and return once the server has the subscription (no missed messages)."""
        collector = cls(nc, subject)
        collector._sub = await nc.subscribe(subject, cb=collector._on_message)
        # The flush round-trip proves the server registered the interest.
        await nc.flush()
        return collector

    @property
    def decoded(self) -> list[Any]:
        """The JSON bodies of the collected messages."""
        return [json.loads(m.data) for m in self.messages]

    @property
    def subjects(self) -> list[str]:
        """The subjects of the collected messages, in arrival order."""
        return [m.subject for m in self.messages]

    async def wait_until(
        self, predicate: Callable[[list[Msg]], bool], timeout: float = 10.0
    ) -> list[Msg]:
        """Return the messages once ``predicate(messages)`` holds; fail after ``timeout`` s."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: predicate(self.messages)), timeout
                )
            except TimeoutError:
                raise AssertionError(
                    f"condition on {self.subject!r} not met within {timeout:g} s; "
                    f"got {len(self.messages)} messages: {self.subjects[-20:]}"
                ) from None
        return self.messages

    async def stop(self) -> None:
        """Unsubscribe; messages collected so far stay."""
        if self._sub is not None and not self.nc.is_closed:
            await self._sub.unsubscribe()
        self._sub = None

    async def _on_message(self, msg: Msg) -> None:
        async with self._changed:
            self.messages.append(msg)
            self._changed.notify_all()


async def publish_prompt(
    nc: Client, session: str, text: str, max_tokens: int = 3, prefix: str = "infer"
) -> str:
    """Publish one greedy user prompt durably, as an agent does; its idempotency key."""
    key = uuid.uuid4().hex
    prompt = PromptRequest(
        messages=(ChatMessage(role="user", content=text),), idempotency_key=key,
        max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0),
    )
    await nc.jetstream().publish(
        Subjects(prefix).prompt(session), prompt.model_dump_json().encode(),
        headers={MSG_ID_HEADER: key},
    )
    return key


async def turn(
    nc: Client, session: str, prompt: PromptRequest, timeout: float = 60, prefix: str = "infer"
) -> dict[str, list[dict[str, Any]]]:
    """Publish ``prompt`` with a fresh idempotency key; its events by kind, once a turn
    committed or the prompt was refused (one prompt at a time per session)."""
    subjects = Subjects(prefix)
    events = await EventCollector.start(nc, subjects.events_all(session))
    key = uuid.uuid4().hex
    body = prompt.model_copy(update={"idempotency_key": key}).model_dump_json()
    await nc.jetstream().publish(subjects.prompt(session), body.encode())

    def finished(ms: list[Msg]) -> bool:
        for m in ms:
            data = json.loads(m.data)
            if m.subject.endswith(".commit") or (
                m.subject.endswith(".error") and data.get("idempotency_key") == key
            ):
                return True
        return False

    await events.wait_until(finished, timeout=timeout)
    await events.stop()
    out: dict[str, list[dict[str, Any]]] = {}
    for m in events.messages:
        out.setdefault(m.subject.rsplit(".", 1)[-1], []).append(json.loads(m.data))
    return out


class LineReader:
    """Reads a pipe on a thread so the test can wait for a line with a deadline."""

    def __init__(self, stream) -> None:  # type: ignore[no-untyped-def]
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)  # the process closed its output: no line can match any more

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first line matching ``pattern``; fails at the deadline or when output ends."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self.lines.put(None)
                break
            self.seen.append(line)
            if m := pattern.search(line):
                return m
        raise AssertionError(f"no line matching {pattern.pattern!r} in {timeout} s: {self.seen}")


def stop_child(proc: subprocess.Popen[str]) -> None:
    """Stop a child ``infernode`` if it still runs: SIGTERM (a node that stops stops its
    embedded nats-server too), then SIGKILL if it has not exited within 30 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


async def openai_base(proc: asyncio.subprocess.Process, timeout: float = 60) -> str:
    """The ``http://…/v1`` base URL a starting ``infernode openai`` prints (after its logs)."""
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode()
        assert line, "infernode openai exited before serving"
        found = re.search(r"OpenAI API on (http://\S+/v1)", line)
        if found:
            return found.group(1)


async def lease_owners_until(
    nc: Client, predicate: Callable[[dict[int, str]], bool], timeout: float,
    prefix: str = "infer",
) -> dict[int, str]:
    """Watch the partition leases until ``predicate(owners)`` holds (partition → node id
    of every held lease); the owners then. Fails after ``timeout`` s with the last owners.

    It sees leases taken, renewed and given back; a lease that runs out by the bucket's TTL
    leaves no message to watch (a killed node's leases stay in ``owners`` until retaken)."""
    subjects = Subjects(prefix)
    kv = await nc.jetstream().key_value(subjects.lease_bucket)
    watcher = await kv.watchall()
    owners: dict[int, str] = {}
    lead = subjects.lease_key(0)[:-1]

    async def watch() -> dict[int, str]:
        caught_up = False  # the watch sends None once it has sent every current lease
        async for entry in watcher:
            if entry is None:
                caught_up = True
            elif entry.key.startswith(lead):
                partition = int(entry.key[len(lead):])
                if entry.operation is None and entry.value:
                    owners[partition] = json.loads(entry.value)["node"]
                else:  # deleted or purged: the lease is free
                    owners.pop(partition, None)
            if caught_up and predicate(owners):
                return owners
        raise AssertionError("the lease watch ended")

    try:
        return await asyncio.wait_for(watch(), timeout)
    except TimeoutError:
        raise AssertionError(f"leases not as wanted within {timeout:g} s: {owners}") from None
    finally:
        await watcher.stop()
