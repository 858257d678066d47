"""The slot pool: a session's own slot first, then free, then least recently used; FIFO waiters."""

from __future__ import annotations

import asyncio

import pytest

from actors.engine.slots import Slot, SlotPool
from tests.helpers import until


async def _until_queued(pool: SlotPool, n: int) -> None:
    await until(lambda: len(pool._waiters) >= n, 5, f"{n} waiters queued")


class _Ctx:
    def close(self) -> None:
        pass


@pytest.fixture
def pool():
    made = SlotPool([Slot(i, _Ctx()) for i in range(2)])
    yield made
    made.close()


async def test_waiters_are_served_in_arrival_order(pool):
    """Given both slots busy, three waiting sessions get slots in the order they asked."""
    held = [await pool.acquire("a"), await pool.acquire("b")]
    for slot, session in zip(held, "ab"):
        slot.session = session
    order: list[str] = []

    async def want(session: str) -> None:
        slot = await pool.acquire(session)
        order.append(session)
        slot.session = session
        await pool.release(slot)

    waiters = [asyncio.ensure_future(want(s)) for s in ("c", "d", "e")]
    await _until_queued(pool, 3)
    await pool.release(held[0])
    await pool.release(held[1])
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert order == ["c", "d", "e"]


async def test_a_session_gets_its_own_resident_slot_back(pool):
    """Given a session that used slot 1, its next acquire returns slot 1, not the free slot 0."""
    first = await pool.acquire("x")
    second = await pool.acquire("y")
    second.session = "y"
    await pool.release(second)
    again = await pool.acquire("y")
    assert again is second and first is not second


async def test_a_cancelled_waiter_leaves_the_queue_and_loses_no_slot(pool):
    """Given a waiter cancelled while queued, the released slot goes to the next waiter."""
    a, b = await pool.acquire("a"), await pool.acquire("b")
    doomed = asyncio.ensure_future(pool.acquire("c"))
    patient = asyncio.ensure_future(pool.acquire("d"))
    await _until_queued(pool, 2)
    doomed.cancel()
    await pool.release(a)
    got = await asyncio.wait_for(patient, 5)
    assert got is a and doomed.cancelled()
    await pool.release(b)
    assert not any(s.busy for s in pool.slots if s is not got)
