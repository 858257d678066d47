"""The bank: KV snapshots of sessions in host RAM (byte caps, LRU) over an optional durable tier.

Owned by the engine, which restores from it, snapshots into it when it evicts a slot, and
banks every committed turn when the bank committer asks. Bytes never cross the bus: a
snapshot can be tens of megabytes. Thread-safe: slot worker threads call it.

Tiers: a resident slot, then this RAM tier, then the durable tier (a directory and/or a
JetStream object store, ``durable``) when one is attached. Before a turn takes its slot, the
engine fetches on the event loop the durable snapshot it would restore (``to_fetch``) and
keeps it here; a lookup on a slot thread reads only local durable backends. Only committed
turns are written to the durable tier.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from actors.engine.bank.meta import Compat, EntryInfo, SnapshotMeta
from actors.engine.tokens import common_prefix

if TYPE_CHECKING:
    from actors.engine.bank.durable import DurableTier

log = structlog.get_logger("bank")

SHARED_HEAD = 16
"""Tokens an entry of another session must share with a prompt to be compared at all."""
SHARED_CANDIDATES = 32
"""Other sessions' entries compared per lookup (most recently used first)."""


@dataclass
class BankEntry:
    """One snapshot in RAM: its metadata and the state bytes."""

    meta: SnapshotMeta
    """Metadata."""
    data: bytes = field(repr=False)
    """The state bytes."""
    durable: bool = False
    """Also held by the durable tier."""
    fetched_ms: float | None = None
    """Set while a snapshot fetched from the durable tier awaits its first restore: how
    long the fetch took (that restore counts as a durable hit and its restore time)."""

    @property
    def nbytes(self) -> int:
        """Size of the state."""
        return len(self.data)

    @property
    def session(self) -> str:
        """Session it belongs to."""
        return self.meta.session

    @property
    def tokens(self) -> tuple[int, ...]:
        """Tokens whose KV state it holds."""
        return self.meta.tokens


@dataclass(frozen=True)
class BankMatch:
    """The result of a lookup: the best entry and how much of the prompt it covers."""

    entry: BankEntry | None
    """Best entry, or None."""
    reused: int
    """Prompt tokens it covers."""
    miss_reason: str | None
    """Why nothing (or only part) was reusable."""
    tier: str = ""
    """``ram`` or ``durable``: where the entry came from."""
    fetch_ms: float = 0.0
    """Time spent fetching it from the durable tier before the lookup."""


class BankStore:
    """Host-RAM tier: per-session entries under a total and a per-session byte cap."""

    def __init__(self, max_bytes: int, max_session_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_session_bytes = max_session_bytes
        self.durable: DurableTier | None = None
        self._entries: dict[str, list[BankEntry]] = {}
        self._by_head: dict[tuple[int, ...], list[BankEntry]] = {}
        """Entries of every session by their first ``SHARED_HEAD`` tokens: content-addressed
        lookups (a fork, a shared system prompt) only compare entries that can match."""
        self._lock = threading.Lock()
        self._bytes = 0
        self.evictions = 0
        self.hits = 0
        self.durable_hits = 0
        self.stored = 0

    def attach(self, durable: DurableTier | None) -> None:
        """Put a durable tier under this one (None detaches it)."""
        self.durable = durable

    def put(self, entry: BankEntry) -> bool:
        """Store ``entry``; drops superseded shorter prefixes; False if it can never fit."""
        if entry.nbytes > min(self.max_bytes, self.max_session_bytes):
            return False
        with self._lock:
            for old in list(self._entries.get(entry.meta.session, ())):
                same = old.meta.token_hash == entry.meta.token_hash
                if same or _is_prefix(old.meta.tokens, entry.meta.tokens):
                    entry.durable = entry.durable or (same and old.durable)
                    self._drop(old)
            self._entries.setdefault(entry.meta.session, []).append(entry)
            if len(entry.meta.tokens) >= SHARED_HEAD:
                self._by_head.setdefault(entry.meta.tokens[:SHARED_HEAD], []).append(entry)
            self._bytes += entry.nbytes
            self.stored += 1
            self._enforce_caps(entry.meta.session)
        return True

    def get(self, session: str, digest: str) -> BankEntry | None:
        """The RAM entry of ``session`` with this token hash."""
        with self._lock:
            return next(
                (e for e in self._entries.get(session, ()) if e.meta.token_hash == digest), None
            )

    def has(self, session: str, digest: str) -> bool:
        """True when ``session`` has a RAM entry with this token hash."""
        return self.get(session, digest) is not None

    def persist(self, entry: BankEntry) -> bool:
        """Queue ``entry`` for the durable tier (off the calling thread); False if none."""
        if self.durable is None:
            return False
        if not entry.durable:
            entry.durable = True
            self.durable.persist(entry.meta, entry.data)
        return True

    def best_match(self, session: str, tokens: Sequence[int], compat: Compat) -> BankMatch:
        """The snapshot sharing the longest token prefix with ``tokens``: one of
        ``session``'s, or content-addressed, one of another session's RAM entries.

        Blocking when the best one lies in the durable tier: call on a slot thread.
        """
        with self._lock:
            ram = [(e.meta, e) for e in self._entries.get(session, ())]
            ram += [(e.meta, e) for e in self._shared(session, tokens)]
        durable = self.durable.entries(session) if self.durable else []
        best: tuple[SnapshotMeta, BankEntry | None] | None = None
        best_n, refused = 0, None
        for meta, entry in [*ram, *((m, None) for m in durable)]:
            reason = meta.fits(compat)
            if reason is not None:
                refused = refused or reason
                continue
            n = common_prefix(meta.tokens, tokens)
            if best is None or n > best_n:
                best, best_n = (meta, entry), n
        if best is None:  # whether the session had state that was evicted is the engine's
            return BankMatch(None, 0, refused or "new_session")
        if best_n == 0:
            return BankMatch(None, 0, "prefix_divergence_at_token 0")
        meta, entry = best
        tier, fetch_ms = "ram", 0.0
        if entry is None:
            entry = self._load(meta)
            if entry is None:
                return BankMatch(None, 0, "evicted")
            tier = "durable"
        elif entry.fetched_ms is not None:
            tier, fetch_ms, entry.fetched_ms = "durable", entry.fetched_ms, None
        with self._lock:
            meta.hits += 1
            meta.last_access = time.time()
            self.hits += 1
            self.durable_hits += tier == "durable"
        partial = best_n < len(meta.tokens)
        reason = f"prefix_divergence_at_token {best_n}" if partial else None
        return BankMatch(entry, best_n, reason, tier, fetch_ms)

    def to_fetch(self, session: str, compat: Compat) -> SnapshotMeta | None:
        """The durable snapshot a turn of ``session`` would restore that RAM lacks, if any.

        The longest one that fits wins; a RAM entry at least as long serves instead.
        """
        if self.durable is None:
            return None
        fits = [m for m in self.durable.entries(session) if m.fits(compat) is None]
        best = max(fits, key=lambda m: len(m.tokens), default=None)
        if best is None:
            return None
        with self._lock:
            in_ram = [e.meta for e in self._entries.get(session, ())]
        if any(len(m.tokens) >= len(best.tokens) and m.fits(compat) is None for m in in_ram):
            return None
        return best

    def _load(self, meta: SnapshotMeta) -> BankEntry | None:
        assert self.durable is not None
        try:
            data = self.durable.load(meta)
        except Exception as e:  # a damaged or vanished snapshot is a miss, never a crash
            log.warning("bank_durable_load_failed", session=meta.session, error=str(e))
            return None
        entry = BankEntry(meta, data, durable=True)
        self.put(entry)
        return entry

    def forget(self, session: str) -> int:
        """Drop every RAM entry of ``session`` (the durable tier is the caller's); how many."""
        with self._lock:
            entries = list(self._entries.get(session, ()))
            for e in entries:
                self._drop(e)
            return len(entries)

    def session_entries(self, session: str) -> list[EntryInfo]:
        """Metadata of a session's entries in every tier (``tier``: ram, durable or both)."""
        with self._lock:
            out = {e.meta.token_hash: {**e.meta.describe(), "tier": "ram"}
                   for e in self._entries.get(session, ())}
        for meta in self.durable.entries(session) if self.durable else []:
            known = out.get(meta.token_hash)
            if known is not None:
                known["tier"] = "ram+durable"
            else:
                out[meta.token_hash] = {**meta.describe(), "tier": "durable"}
        return sorted(out.values(), key=lambda e: int(e["tokens"]))

    def stats(self) -> dict[str, int]:
        """Totals of the tier (and of the durable tier under it)."""
        with self._lock:
            n = sum(len(v) for v in self._entries.values())
            out = {
                "entries": n, "bytes": self._bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "durable_hits": self.durable_hits,
                "evictions": self.evictions, "stored": self.stored,
            }
        if self.durable is not None:
            out.update({f"durable_{k}": v for k, v in self.durable.stats().items()})
        return out

    def _shared(self, session: str, tokens: Sequence[int]) -> list[BankEntry]:
        """Other sessions' entries that start like ``tokens``, most recently used first.

        Restoring one is safe: only the common prefix is kept, and the KV state of the same
        tokens under the same model and template is the same whoever computed it.
        """
        same_head = self._by_head.get(tuple(tokens[:SHARED_HEAD]), [])
        others = [e for e in same_head if e.meta.session != session]
        others.sort(key=lambda e: e.meta.last_access, reverse=True)
        return others[:SHARED_CANDIDATES]

    def _drop(self, entry: BankEntry) -> None:
        mine = self._entries.get(entry.meta.session, [])
        if entry in mine:
            mine.remove(entry)
            self._bytes -= entry.nbytes
        if not mine:
            self._entries.pop(entry.meta.session, None)
        key = entry.meta.tokens[:SHARED_HEAD]
        # By identity: entries compare by value, and their bytes can be megabytes.
        rest = [e for e in self._by_head.get(key, ()) if e is not entry]
        if rest:
            self._by_head[key] = rest
        else:
            self._by_head.pop(key, None)

    def _evict(self, entry: BankEntry) -> None:
        self._drop(entry)
        self.evictions += 1

    def _enforce_caps(self, session: str) -> None:
        mine = self._entries.get(session, [])
        while sum(e.nbytes for e in mine) > self.max_session_bytes and len(mine) > 1:
            self._evict(min(mine, key=lambda e: e.meta.last_access))
        while self._bytes > self.max_bytes:
            victim = min(
                (e for es in self._entries.values() for e in es),
                key=lambda e: e.meta.last_access,
            )
            self._evict(victim)


def _is_prefix(short: Sequence[int], long: Sequence[int]) -> bool:
    return len(short) <= len(long) and tuple(long[: len(short)]) == tuple(short)
