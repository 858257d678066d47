"""The bank: KV snapshots of sessions, kept in host RAM under byte caps, LRU.

Shared by the engine (which restores from it and snapshots into it when it evicts a slot)
and the bank committer (which banks every committed turn). Bytes never cross the bus: a
snapshot can be tens of megabytes. Thread-safe: slot worker threads call it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field


def token_hash(tokens: Sequence[int]) -> str:
    """sha256 of token ids (as little-endian int32)."""
    return hashlib.sha256(array("i", tokens).tobytes()).hexdigest()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: histories run to thousands of tokens.
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class BankEntry:
    """One snapshot: the KV state after ``tokens``."""

    session: str
    """Session it belongs to."""
    tokens: tuple[int, ...]
    """Tokens whose KV state the snapshot holds."""
    data: bytes = field(repr=False)
    """The state bytes."""
    model_id: str
    """Model the state belongs to."""
    token_hash: str = ""
    """sha256 of ``tokens``."""
    created: float = field(default_factory=time.time)
    """Unix time of the snapshot."""
    last_access: float = field(default_factory=time.time)
    """Unix time of the last hit."""
    hits: int = 0
    """Times a turn restored it."""

    def __post_init__(self) -> None:
        if not self.token_hash:
            self.token_hash = token_hash(self.tokens)

    @property
    def nbytes(self) -> int:
        """Size of the state."""
        return len(self.data)

    def describe(self) -> dict[str, str | int | float]:
        """Metadata without the bytes."""
        return {
            "session": self.session,
            "tokens": len(self.tokens),
            "token_hash": self.token_hash,
            "nbytes": self.nbytes,
            "created": self.created,
            "last_access": self.last_access,
            "hits": self.hits,
        }


@dataclass(frozen=True)
class BankMatch:
    """The result of a lookup: the best entry and how much of the prompt it covers."""

    entry: BankEntry | None
    """Best entry, or None."""
    reused: int
    """Prompt tokens it covers."""
    miss_reason: str | None
    """Why nothing (or only part) was reusable."""


class BankStore:
    """Host-RAM tier: per-session entries under a total and a per-session byte cap."""

    def __init__(self, max_bytes: int, max_session_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_session_bytes = max_session_bytes
        self._entries: dict[str, list[BankEntry]] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self.evictions = 0
        self.hits = 0
        self.stored = 0

    def put(self, entry: BankEntry) -> bool:
        """Store ``entry``; drops superseded shorter prefixes; False if it can never fit."""
        if entry.nbytes > min(self.max_bytes, self.max_session_bytes):
            return False
        with self._lock:
            mine = self._entries.setdefault(entry.session, [])
            for old in list(mine):
                if old.token_hash == entry.token_hash or _is_prefix(old.tokens, entry.tokens):
                    self._drop(old)
            mine = self._entries.setdefault(entry.session, [])
            mine.append(entry)
            self._bytes += entry.nbytes
            self.stored += 1
            self._enforce_caps(entry.session)
        return True

    def has(self, session: str, digest: str) -> bool:
        """True when ``session`` has an entry with this token hash."""
        with self._lock:
            return any(e.token_hash == digest for e in self._entries.get(session, ()))

    def best_match(self, session: str, tokens: Sequence[int], model_id: str) -> BankMatch:
        """The entry sharing the longest token prefix with ``tokens`` (own session first)."""
        with self._lock:
            own = self._entries.get(session, [])
            best, best_n = None, 0
            wrong_model = False
            for entry in own:
                if entry.model_id != model_id:
                    wrong_model = True
                    continue
                n = common_prefix(entry.tokens, tokens)
                if n > best_n:
                    best, best_n = entry, n
            if best is None:
                reason = "model_mismatch" if wrong_model else "new_session"
                return BankMatch(None, 0, reason)
            best.hits += 1
            best.last_access = time.time()
            self.hits += 1
            partial = best_n < len(best.tokens)
            reason = f"prefix_divergence_at_token {best_n}" if partial else None
            return BankMatch(best, best_n, reason)

    def forget(self, session: str) -> int:
        """Drop every entry of ``session``; returns how many."""
        with self._lock:
            entries = list(self._entries.get(session, ()))
            for e in entries:
                self._drop(e)
            return len(entries)

    def session_entries(self, session: str) -> list[dict[str, str | int | float]]:
        """Metadata of a session's entries."""
        with self._lock:
            return [e.describe() for e in self._entries.get(session, ())]

    def stats(self) -> dict[str, int]:
        """Totals of the tier."""
        with self._lock:
            n = sum(len(v) for v in self._entries.values())
            return {
                "entries": n,
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "evictions": self.evictions,
                "stored": self.stored,
            }

    def _drop(self, entry: BankEntry) -> None:
        mine = self._entries.get(entry.session, [])
        if entry in mine:
            mine.remove(entry)
            self._bytes -= entry.nbytes
        if not mine:
            self._entries.pop(entry.session, None)

    def _enforce_caps(self, session: str) -> None:
        mine = self._entries.get(session, [])
        while sum(e.nbytes for e in mine) > self.max_session_bytes and len(mine) > 1:
            self._drop(min(mine, key=lambda e: e.last_access))
            self.evictions += 1
        while self._bytes > self.max_bytes:
            victim = min(
                (e for es in self._entries.values() for e in es), key=lambda e: e.last_access
            )
            self._drop(victim)
            self.evictions += 1


def _is_prefix(short: Sequence[int], long: Sequence[int]) -> bool:
    return len(short) <= len(long) and tuple(long[: len(short)]) == tuple(short)
