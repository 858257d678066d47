"""The bank: KV snapshots of sessions in host RAM (byte caps, LRU) over an optional durable tier.

Owned by the engine, which restores from it, snapshots into it when it evicts a slot, and
banks every committed turn when the bank committer asks. Bytes never cross the bus: a
snapshot can be tens of megabytes. Thread-safe: slot worker threads call it.

Tiers: a resident slot, then this RAM tier, then the durable tier (a directory and/or a
JetStream object store, ``durable``) when one is attached. Before a turn takes its slot, the
engine fetches on the event loop the durable snapshot it would restore (``to_fetch``) and
keeps it here; a lookup on a slot thread reads only local durable backends. Only committed
turns are written to the durable tier.

Entries are also found by content: a session whose prompt begins with another session's
banked tokens (a shared system prompt and tool list) restores that snapshot, found through
the block hash chain index (``prefix``) and checked token by token — but only a session of
the same trust domain (``domains``: the agent, or a group an operator declared), whose salt
every content address carries, so no agent learns from a hit what another sent. A state of
exactly the same tokens is stored once in RAM per domain, by the session that banked it
last (the same bytes); the durable tier keeps a copy per session, so deleting one session
never takes another's.

A state read back from the durable tier is restored only once its checksum (``meta``)
matches; a corrupt one is dropped from every tier and the turn's miss says ``corrupt``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from actors.engine.bank.domains import ISOLATED, ShareGroups
from actors.engine.bank.meta import Compat, EntryInfo, SnapshotMeta, intact
from actors.engine.bank.prefix import PrefixIndex
from actors.engine.tokens import BLOCK as BLOCK_SIZE
from actors.engine.tokens import common_prefix

if TYPE_CHECKING:
    from actors.engine.bank.durable import DurableTier

log = structlog.get_logger("bank")


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
    checked: bool = True
    """Its bytes were made by this process, or were read back and matched their checksum;
    False until a state read from the durable tier is checked (before its first restore)."""

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
    shared: bool = False
    """The entry was banked by another session: only its common prefix is reused."""


class BankStore:
    """Host-RAM tier: per-session entries under a total and a per-session byte cap."""

    def __init__(
        self, max_bytes: int, max_session_bytes: int, groups: ShareGroups = ISOLATED
    ) -> None:
        self.max_bytes = max_bytes
        self.max_session_bytes = max_session_bytes
        self.groups = groups
        """Which sessions share snapshots (``domains``)."""
        self.durable: DurableTier | None = None
        self._entries: dict[str, list[BankEntry]] = {}
        self._by_hash: dict[tuple[str, str], BankEntry] = {}
        """Every RAM entry by its domain and token hash (one per token sequence and domain)."""
        self._prefixes = PrefixIndex(groups)
        self._lock = threading.Lock()
        self._bytes = 0
        self.evictions = 0
        self.hits = 0
        self.durable_hits = 0
        self.stored = 0
        self.shared_hits = 0
        self.corrupt = 0

    def attach(self, durable: DurableTier | None) -> None:
        """Put a durable tier under this one (None detaches it); both share alike."""
        if durable is not None and durable.prefixes.groups != self.groups:
            raise ValueError("the durable tier was opened with other bank share groups")
        self.durable = durable

    def _key(self, meta: SnapshotMeta) -> tuple[str, str]:
        return self.groups.domain(meta.session), meta.token_hash

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
            key = self._key(entry.meta)
            twin = self._by_hash.get(key)
            if twin is not None and twin.meta.session != entry.meta.session:
                # The same tokens' state, banked again in this domain: keep one copy in RAM.
                # The durable tier holds the twin under its session's name, not this one's.
                self._drop(twin)
            self._entries.setdefault(entry.meta.session, []).append(entry)
            self._by_hash[key] = entry
            self._prefixes.add(entry.meta)
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

    def find(self, session: str, digest: str, compat: Compat) -> BankEntry | None:
        """The checked RAM entry of any session of ``session``'s domain holding exactly the
        tokens of ``digest``."""
        with self._lock:
            entry = self._by_hash.get((self.groups.domain(session), digest))
        if entry is None or not entry.checked or entry.meta.fits(compat) is not None:
            return None
        return entry

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
        """The snapshot of ``session`` sharing the longest token prefix with ``tokens``.

        Blocking when the best one lies in the durable tier: call on a slot thread.
        """
        with self._lock:
            ram = [(e.meta, e) for e in self._entries.get(session, ())]
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
        shared = self._shared_match(session, tokens, compat, best_n)
        if shared is not None and shared.entry is not None:
            return shared
        failed = shared.miss_reason if shared is not None else None  # corrupt or evicted
        if best is None:  # whether the session had state that was evicted is the engine's
            return BankMatch(None, 0, failed or refused or "new_session")
        if best_n == 0:
            return BankMatch(None, 0, failed or "prefix_divergence_at_token 0")
        meta, entry = best
        partial = best_n < len(meta.tokens)
        reason = f"prefix_divergence_at_token {best_n}" if partial else None
        return self._hit(meta, entry, best_n, reason, shared=False)

    def _shared_match(
        self, session: str, tokens: Sequence[int], compat: Compat, own: int
    ) -> BankMatch | None:
        """Another session's snapshot covering more of ``tokens`` than ``own`` tokens, if any:
        of ``session``'s trust domain only (the chain is salted with it).

        Durable snapshots are only taken from local backends (this runs on a slot thread).
        """
        if (len(tokens) // BLOCK_SIZE) * BLOCK_SIZE <= own:
            return None
        chain = self._prefixes.chain_of(session, tokens)
        domain = self.groups.domain(session)

        def accept(meta: SnapshotMeta) -> bool:
            return (meta.session != session and meta.fits(compat) is None
                    and self.groups.domain(meta.session) == domain)

        found: list[tuple[SnapshotMeta, BankEntry | None]] = []
        for meta in self._prefixes.longest(chain, accept):
            with self._lock:
                found.append((meta, self._by_hash.get((domain, meta.token_hash))))
        durable = self.durable
        if durable is not None and durable.readable_here:
            found += [(m, None) for m in durable.prefixes.longest(chain, accept)]
        best = max(found, key=lambda c: common_prefix(c[0].tokens, tokens), default=None)
        if best is None:
            return None
        n = common_prefix(best[0].tokens, tokens)
        if n <= own:
            return None
        partial = n < len(best[0].tokens)
        reason = f"prefix_divergence_at_token {n}" if partial else None
        return self._hit(best[0], best[1], n, reason, shared=True)

    def _hit(
        self, meta: SnapshotMeta, entry: BankEntry | None, n: int, reason: str | None,
        shared: bool,
    ) -> BankMatch:
        """Count a restore of ``meta`` (loading it from the durable tier when not in RAM); a
        miss when it cannot be loaded (``evicted``) or fails its checksum (``corrupt``)."""
        tier, fetch_ms = "ram", 0.0
        if entry is None:
            entry = self._load(meta)
            if entry is None:
                return BankMatch(None, 0, "evicted")
            tier = "durable"
        elif entry.fetched_ms is not None:
            tier, fetch_ms = "durable", entry.fetched_ms
        if not self.check(entry):
            return BankMatch(None, 0, "corrupt")
        entry.fetched_ms = None
        with self._lock:
            meta.hits += 1
            meta.last_access = time.time()
            self.hits += 1
            self.durable_hits += tier == "durable"
            self.shared_hits += shared
        return BankMatch(entry, n, reason, tier, fetch_ms, shared)

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
        entry = BankEntry(meta, data, durable=True, checked=False)
        self.put(entry)
        return entry

    def check(self, entry: BankEntry) -> bool:
        """True when ``entry``'s bytes may be restored: made here, or matching their checksum.

        One check for every tier, before every restore: a state read back that fails it is
        dropped from RAM and from the durable tier, and never used.
        """
        if entry.checked:
            return True
        if intact(entry.meta, entry.data):
            entry.checked = True
            return True
        meta = entry.meta
        log.warning("bank_snapshot_corrupt", session=meta.session, tokens=len(meta.tokens),
                    token_hash=meta.token_hash[:12])
        with self._lock:
            self.corrupt += 1
            self._drop(entry)
        if self.durable is not None:
            self.durable.discard(meta)
        return False

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
                "shared_hits": self.shared_hits, "corrupt": self.corrupt,
            }
        if self.durable is not None:
            out.update({f"durable_{k}": v for k, v in self.durable.stats().items()})
        return out

    def _drop(self, entry: BankEntry) -> None:
        mine = self._entries.get(entry.meta.session, [])
        if entry in mine:
            mine.remove(entry)
            self._bytes -= entry.nbytes
            self._prefixes.remove(entry.meta)
            key = self._key(entry.meta)
            if self._by_hash.get(key) is entry:
                del self._by_hash[key]
        if not mine:
            self._entries.pop(entry.meta.session, None)

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
