"""Slots: one context each, served by one long-lived worker thread each, assigned LRU.

Blocking llama.cpp calls run on the slot's worker thread, never on the event loop and never
on a thread made per call. Assignment happens on the event loop, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from actors.engine.interface import BackendContext

T = TypeVar("T")
_Job = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class SlotWorker:
    """A thread that runs a slot's jobs in order."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the worker; the returned future resolves on the calling loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, fut, loop))
        return fut

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:  # stop
                return
            fn, fut, loop = job
            try:
                result = fn()
            except BaseException as e:  # handed to the awaiting coroutine
                loop.call_soon_threadsafe(_set_exception, fut, e)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued jobs, then end the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)


def _set_result(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[object], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class Slot:
    """A context, the tokens its KV cache holds, and the session it belongs to."""

    def __init__(self, index: int, ctx: BackendContext) -> None:
        self.index = index
        self.ctx = ctx
        self.worker = SlotWorker(f"slot-{index}")
        self.session: str | None = None
        self.tokens: list[int] = []
        self.busy = False
        self.last_used = 0.0


class SlotPool:
    """Hands out slots: the session's own if resident, else a free one, else the LRU idle."""

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots
        self._changed = asyncio.Condition()

    def resident(self, session: str) -> Slot | None:
        """The slot holding ``session``, if any."""
        return next((s for s in self.slots if s.session == session), None)

    async def acquire(self, session: str) -> Slot:
        """Wait for a slot for ``session`` and mark it busy."""
        async with self._changed:
            while True:
                slot = self._pick(session)
                if slot is not None:
                    slot.busy = True
                    return slot
                await self._changed.wait()

    def _pick(self, session: str) -> Slot | None:
        own = self.resident(session)
        if own is not None:
            return None if own.busy else own
        idle = [s for s in self.slots if not s.busy]
        if not idle:
            return None
        free = [s for s in idle if s.session is None]
        return free[0] if free else min(idle, key=lambda s: s.last_used)

    async def release(self, slot: Slot) -> None:
        """Mark ``slot`` idle and wake waiters."""
        async with self._changed:
            slot.busy = False
            slot.last_used = time.monotonic()
            self._changed.notify_all()

    def close(self) -> None:
        """Join every worker, then free the contexts."""
        for s in self.slots:
            s.worker.stop()
        for s in self.slots:
            s.ctx.close()
