"""The engine's side of the bank: snapshots of slots, evictions, and durable fetches.

``SlotBank`` is owned by ``SlotEngine`` (``actors/engine/engine.py``), which hands it what
it works on when it makes it: the slot pool, the bank, the compatibility key of this model,
the counters and a read-only view of which sessions run a turn. It keeps which sessions'
states were pushed out, so a later miss says ``evicted``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Container

import structlog

from actors.engine.bank.meta import Compat, SnapshotMeta
from actors.engine.bank.store import BankEntry, BankStore
from actors.engine.interface import SnapshotOutcome
from actors.engine.slots import Slot, SlotPool
from actors.engine.stats import EngineStats
from actors.engine.tokens import token_hash

log = structlog.get_logger("engine")

SNAPSHOT_SETTLE_S = 0.05
"""How long a commit snapshot lets the session's next turn go first (see ``snapshot``)."""
IDLE_BANK_WAIT_S = 2.0
"""How long a new session waits for idle slots to be banked before it looks for a prefix."""


class SlotBank:
    """Banks the states of one engine's slots: at commits, evictions, and for new sessions."""

    def __init__(
        self, bank: BankStore | None, pool: SlotPool, compat: Compat, stats: EngineStats,
        running: Container[str],
    ) -> None:
        self.bank = bank
        """None when snapshots are off: evictions then only count, and snapshots refuse."""
        self.pool = pool
        self.compat = compat
        self.stats = stats
        self._running = running
        """Sessions with a turn running or waiting for a slot (the engine's, read here)."""
        self._evicted: set[str] = set()
        """Sessions whose state left a slot or the RAM bank: a later miss says ``evicted``."""

    def was_evicted(self, session: str) -> bool:
        """True when the session's state was pushed out of a slot since it was last here."""
        return session in self._evicted

    def forget(self, session: str) -> None:
        """Forget a deleted session's eviction."""
        self._evicted.discard(session)

    async def fetch_durable(self, session: str) -> None:
        """Bring the snapshot a turn would restore from the durable tier into RAM, on the loop.

        Done before the slot is taken, so a slot thread never waits on the event loop for an
        object-store read (a miss here only means the turn computes what it cannot restore).
        """
        bank = self.bank
        if bank is None or bank.durable is None or self.pool.resident(session) is not None:
            return
        meta = bank.to_fetch(session, self.compat)
        if meta is None:
            return
        start = time.perf_counter()
        try:
            data = await bank.durable.fetch(meta)
        except Exception as e:
            log.warning("bank_durable_load_failed", session=session, error=str(e))
            return
        ms = (time.perf_counter() - start) * 1000
        # Checked against its checksum before its first restore (``BankStore.check``).
        bank.put(BankEntry(meta, data, durable=True, fetched_ms=ms, checked=False))

    async def bank_idle_slots(self, session: str) -> None:
        """Bank every idle slot whose state is not banked yet, before a new session looks.

        A turn's commit snapshot is requested over the bus after its answer is out, so the
        next agent of a mesh, sharing its long system prompt, can arrive first and find
        nothing to share: it would prefill the whole prompt again. Copying those states now
        costs what the commit snapshot would have (which then finds them banked by content).
        Only slots of the new session's trust domain: no other state could be shared with it,
        and copying one would let its first token's time say whose state was idle.
        """
        bank = self.bank
        if bank is None:
            return
        domain = bank.groups.domain(session)
        jobs = [
            slot.worker.submit(lambda slot=slot, owner=slot.session, digest=slot.digest:
                               self._bank_if_idle(slot, owner, digest))
            for slot in self.pool.slots
            if not slot.busy and slot.session not in (None, session) and slot.tokens
            and slot.digest is not None and bank.groups.domain(slot.session) == domain
            and bank.find(slot.session, slot.digest, self.compat) is None
        ]
        if jobs:
            done, _ = await asyncio.wait(jobs, timeout=IDLE_BANK_WAIT_S)
            for job in done:
                if job.exception() is not None:
                    log.warning("bank_idle_slot_failed", error=str(job.exception()))

    def _bank_if_idle(self, slot: Slot, session: str | None, digest: str | None) -> None:
        if slot.session != session or slot.digest != digest or slot.digest is None:
            return  # it moved on: whatever it held was banked or superseded
        if slot.busy and session in self._running:
            return  # that session's next turn waits behind this job: its commit banks it
        self._bank_slot(slot, persist=False)

    # -- states in and out of slots --------------------------------------------------------
    def evict(self, slot: Slot) -> None:
        """Push the slot's session out (banked in RAM first when there is a bank)."""
        old = slot.session
        assert old is not None
        self._evicted.add(old)
        self.stats.slot_evictions += 1
        if self.bank is not None and slot.tokens:
            self._bank_slot(slot, persist=False)
        log.info("slot_evicted", slot=slot.index, session=old, tokens=len(slot.tokens))
        slot.session, slot.tokens, slot.digest = None, [], None

    def _bank_slot(self, slot: Slot, persist: bool) -> SnapshotOutcome:
        """Copy the slot's state into RAM (and, for commits, queue it for the durable tier)."""
        assert self.bank is not None and slot.session is not None
        n = len(slot.tokens)
        # Only a state a failed turn left behind has no digest yet.
        digest = slot.digest or token_hash(slot.tokens)
        # Any session's of this domain: stored once.
        existing = self.bank.find(slot.session, digest, self.compat)
        if existing is not None:
            existing = self._claim(existing, slot.session)
            if persist:
                self.bank.persist(existing)
            return SnapshotOutcome(True, n, existing.nbytes, 0.0, "already_banked")
        start = time.perf_counter()
        data = slot.ctx.state_bytes()
        ms = (time.perf_counter() - start) * 1000
        meta = SnapshotMeta(
            session=slot.session, tokens=tuple(slot.tokens), nbytes=len(data),
            model_id=self.compat.model_id, n_ctx=self.compat.n_ctx,
            template=self.compat.template, token_hash=digest,
        )
        entry = BankEntry(meta, data)
        in_ram = self.bank.put(entry)
        durable = persist and self.bank.persist(entry)
        if not (in_ram or durable):
            return SnapshotOutcome(False, n, len(data), ms, "too_large_for_bank")
        return SnapshotOutcome(True, n, len(data), ms, None if in_ram else "durable_only")

    def _bank_known(self, session: str, digest: str, why: str) -> SnapshotOutcome:
        """The slot moved on: make durable what an eviction already banked, if anything."""
        assert self.bank is not None
        entry = self.bank.find(session, digest, self.compat)
        if entry is None:
            return SnapshotOutcome(False, reason=why)
        entry = self._claim(entry, session)
        self.bank.persist(entry)
        n = len(entry.meta.tokens)
        return SnapshotOutcome(True, n, entry.nbytes, 0.0, "banked_at_eviction")

    def _claim(self, entry: BankEntry, session: str) -> BankEntry:
        """``entry`` as ``session``'s: the same tokens' state banked by another session of its
        trust domain is taken over (the same bytes, no copy; one entry in RAM), so deleting
        the session that banked it first never takes this one's state with it."""
        assert self.bank is not None
        if entry.meta.session == session:
            return entry
        claimed = BankEntry(dataclasses.replace(entry.meta, session=session), entry.data)
        self.bank.put(claimed)
        return claimed

    async def snapshot(self, session: str, digest: str, wait_s: float) -> SnapshotOutcome:
        """Bank the exact state ``digest`` of ``session`` once its slot is idle (bounded)."""
        if self.bank is None:
            return SnapshotOutcome(False, reason="snapshots_disabled")
        # A turn's state is most often extended at once by the session's next turn (a tool
        # result, an agent's follow-up): a copy started first would sit on that turn's time
        # to first token. Settling a moment lets that turn take the slot; its commit banks
        # the longer state, and a new session that could share this one banks it itself
        # before it looks (``bank_idle_slots``).
        await asyncio.sleep(SNAPSHOT_SETTLE_S)
        slot = self.pool.resident(session)
        if slot is None:
            return self._bank_known(session, digest, "not_resident")
        if slot.busy:
            # The turn being committed released its slot before its result was sent, so a busy
            # slot of this session runs a newer turn: its state extends this one, its commit
            # banks it. Waiting would only hold the snapshot until it is superseded.
            return self._bank_known(session, digest, "superseded")
        gate = threading.Lock()
        state = {"expired": False, "started": False}

        def job() -> SnapshotOutcome:
            with gate:
                if state["expired"]:
                    return SnapshotOutcome(False, reason="deadline")
                state["started"] = True
            if slot.session != session or slot.digest != digest:
                return self._bank_known(session, digest, "superseded")
            if slot.busy and session in self._running:
                # This session's next turn holds the slot and waits behind this job: copying
                # the state now would put the copy on that turn's time to first token. Its
                # state extends this one and its commit banks it.
                return self._bank_known(session, digest, "superseded")
            return self._bank_slot(slot, persist=True)

        fut = slot.worker.submit(job)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), wait_s)
        except TimeoutError:
            with gate:
                state["expired"] = True
                started = state["started"]
            if not started:
                return SnapshotOutcome(
                    False, reason=f"deadline: the slot stayed busy for {wait_s:g} s"
                )
            try:  # already copying: that ends in moments, keep it
                return await fut
            except Exception as e:
                return _failed_snapshot(session, e)
        except Exception as e:
            return _failed_snapshot(session, e)


def _failed_snapshot(session: str, e: Exception) -> SnapshotOutcome:
    """A failed copy costs this snapshot only, never the turn or its record."""
    log.warning("bank_snapshot_failed", session=session, error=str(e))
    return SnapshotOutcome(False, reason=f"error: {e}")
