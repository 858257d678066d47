"""Slots: one context each, served by one long-lived worker thread each, assigned LRU.

Blocking llama.cpp calls run on the slot's worker thread, never on the event loop and never
on a thread made per call. Assignment happens on the event loop, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
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
        self.digest: str | None = None
        """sha256 of ``tokens`` where known (after a turn or a restore); None once they change."""
        self.busy = False
        self.last_used = 0.0


class SlotPool:
    """Hands out slots: the session's own if resident, else a free one, else the LRU idle.

    Waiters queue in arrival order and a release serves them in that order, waking only the
    ones it can serve (not every waiter on every release).
    """

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = slots
        self._waiters: deque[tuple[str, asyncio.Future[Slot]]] = deque()

    def busy_count(self) -> int:
        """Slots running a turn now (read from worker threads: a count of bools, no lock)."""
        return sum(s.busy for s in self.slots)

    def resident(self, session: str) -> Slot | None:
        """The slot holding ``session``, if any."""
        return next((s for s in self.slots if s.session == session), None)

    async def acquire(self, session: str) -> Slot:
        """Wait for a slot for ``session`` and mark it busy."""
        if not self._waiters:
            slot = self._pick(session)
            if slot is not None:
                slot.busy = True
                return slot
        fut: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        entry = (session, fut)
        self._waiters.append(entry)
        self._dispatch()
        try:
            return await fut
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif fut.done() and not fut.cancelled():
                self._free(fut.result())  # granted just as the waiter was cancelled
            raise

    def _pick(self, session: str) -> Slot | None:
        own = self.resident(session)
        if own is not None:
            return None if own.busy else own
        idle = [s for s in self.slots if not s.busy]
        if not idle:
            return None
        free = [s for s in idle if s.session is None]
        return free[0] if free else min(idle, key=lambda s: s.last_used)

    def _dispatch(self) -> None:
        for entry in list(self._waiters):
            session, fut = entry
            if fut.done():
                self._waiters.remove(entry)
                continue
            slot = self._pick(session)
            if slot is None:
                if not any(not s.busy for s in self.slots):
                    return  # nothing idle: no later waiter can be served either
                continue
            slot.busy = True
            self._waiters.remove(entry)
            fut.set_result(slot)

    def _free(self, slot: Slot) -> None:
        slot.busy = False
        slot.last_used = time.monotonic()
        self._dispatch()

    async def release(self, slot: Slot) -> None:
        """Mark ``slot`` idle and hand it to the first waiter it can serve."""
        self._free(slot)

    def close(self) -> None:
        """Join every worker, then free the contexts."""
        for s in self.slots:
            s.worker.stop()
        for s in self.slots:
            s.ctx.close()
