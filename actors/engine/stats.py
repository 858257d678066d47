"""What the engine measured: prefix-cache hit ratio, latency percentiles, per-session cache.

Updated on slot threads as each turn ends; read on the event loop by admin (``sessions``,
``metrics``), hence the lock.
Latencies keep a bounded window of recent turns, so percentiles describe current behaviour.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from schemas.chat import CacheInfo, Timings, Usage

WINDOW = 2048
"""Recent turns the percentiles are computed over."""


@dataclass(frozen=True)
class LastTurn:
    """Cache facts of a session's most recent turn."""

    prompt_tokens: int
    cached_tokens: int
    source: str
    miss_reason: str | None
    tier: str = ""


def percentiles(values: list[float]) -> dict[str, float]:
    """count, p50, p90, p99 and max (nearest rank) of ``values``."""
    if not values:
        return {"count": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]

    return {
        "count": float(len(ordered)), "p50": rank(0.50), "p90": rank(0.90),
        "p99": rank(0.99), "max": ordered[-1],
    }


class EngineStats:
    """Counters and windows of the engine's turns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.turns = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.restores = 0
        self.slot_evictions = 0
        self.misses: dict[str, int] = {}
        self.last: dict[str, LastTurn] = {}
        self._ttft: deque[float] = deque(maxlen=WINDOW)
        self._decode_tok: deque[float] = deque(maxlen=WINDOW)
        self._restore: deque[float] = deque(maxlen=WINDOW)
        self._prefill_tok: deque[float] = deque(maxlen=WINDOW)

    def record(self, session: str, usage: Usage, cache: CacheInfo, t: Timings, tier: str) -> None:
        """Account one finished turn."""
        with self._lock:
            self._record(session, usage, cache, t, tier)

    def _record(self, session: str, usage: Usage, cache: CacheInfo, t: Timings, tier: str) -> None:
        self.turns += 1
        self.prompt_tokens += usage.prompt_tokens
        self.cached_tokens += usage.cached_tokens
        self.last[session] = LastTurn(
            usage.prompt_tokens, usage.cached_tokens, cache.source, cache.miss_reason, tier
        )
        if cache.miss_reason:
            kind = cache.miss_reason.split(" ")[0]
            self.misses[kind] = self.misses.get(kind, 0) + 1
        if cache.source == "bank":
            self.restores += 1
            self._restore.append(cache.restore_ms)
        self._ttft.append(t.ttft_ms)
        if usage.completion_tokens:
            self._decode_tok.append(t.decode_ms / usage.completion_tokens)
        if usage.new_prefill_tokens:
            self._prefill_tok.append(t.prefill_ms / usage.new_prefill_tokens)

    def forget(self, session: str) -> None:
        """A session was deleted."""
        with self._lock:
            self.last.pop(session, None)

    @property
    def hit_ratio(self) -> float:
        """Prefix-cache hit tokens ÷ prompt (query) tokens, over every turn."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def latency(self) -> dict[str, dict[str, float]]:
        """Percentiles in milliseconds: TTFT, decode per token, restore, prefill per token."""
        with self._lock:
            windows = {
                "ttft_ms": list(self._ttft),
                "decode_ms_per_token": list(self._decode_tok),
                "restore_ms": list(self._restore),
                "prefill_ms_per_token": list(self._prefill_tok),
            }
        return {name: percentiles(values) for name, values in windows.items()}

    def counters(self) -> dict[str, float]:
        """Flat counters for the metrics reply."""
        with self._lock:
            misses = dict(self.misses)
        out = {
            "turns": float(self.turns), "prompt_tokens": float(self.prompt_tokens),
            "cached_tokens": float(self.cached_tokens), "prefix_hit_ratio": self.hit_ratio,
            "restores": float(self.restores), "slot_evictions": float(self.slot_evictions),
        }
        out.update({f"miss_{k}": float(v) for k, v in misses.items()})
        return out
