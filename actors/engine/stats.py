"""What the engine measured: prompt and cache token counts, latency histograms, per-session cache.

Updated on slot threads as each turn ends; read on the event loop by admin (``sessions``,
``metrics``), hence the lock. Latencies are Prometheus histograms in seconds (cumulative
bucket counts and a sum): they add up across nodes and over time, unlike a window's
percentiles. The histograms are owned here and registered by the node's metrics collector.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import Histogram

from schemas.chat import CacheInfo, Timings, Usage

# Bucket upper bounds in seconds, spanning a tiny CPU model to a large one on a loaded host.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)
RESTORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(frozen=True)
class LastTurn:
    """Cache facts of a session's most recent turn."""

    prompt_tokens: int
    cached_tokens: int
    source: str
    miss_reason: str | None
    tier: str = ""


class EngineStats:
    """Counters and latency histograms of the engine's turns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.turns = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.slot_evictions = 0
        self.proposed_tokens = 0
        self.accepted_tokens = 0
        self.misses: dict[str, int] = {}
        self.last: dict[str, LastTurn] = {}
        # Unregistered (registry=None): each engine owns its own, so two nodes in one
        # process never share a global registry; the node's collector yields them.
        self.ttft = Histogram(
            "infernode_time_to_first_token_seconds",
            "Time from a turn's start to its first generated token.",
            buckets=TTFT_BUCKETS, registry=None,
        )
        self.prefill = Histogram(
            "infernode_prefill_seconds_per_token",
            "Prefill time of a turn divided by the prompt tokens it evaluated (not reused).",
            buckets=PER_TOKEN_BUCKETS, registry=None,
        )
        self.decode = Histogram(
            "infernode_decode_seconds_per_token",
            "Decode time of a turn divided by the tokens it generated.",
            buckets=PER_TOKEN_BUCKETS, registry=None,
        )
        self.restore = Histogram(
            "infernode_bank_restore_seconds",
            "Time to restore a banked KV snapshot into a slot (a durable read included).",
            buckets=RESTORE_BUCKETS, registry=None,
        )
        self.queue = Histogram(
            "infernode_queue_seconds",
            "Time a turn waited between its prompt being recorded and the engine taking it.",
            buckets=QUEUE_BUCKETS, registry=None,
        )

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
            self.restore.observe(cache.restore_ms / 1000)
        self.ttft.observe(t.ttft_ms / 1000)
        self.queue.observe(t.queue_ms / 1000)
        if usage.completion_tokens:
            self.decode.observe(t.decode_ms / 1000 / usage.completion_tokens)
        if usage.new_prefill_tokens:
            self.prefill.observe(t.prefill_ms / 1000 / usage.new_prefill_tokens)

    def speculated(self, proposed: int, accepted: int) -> None:
        """Account one reply's proposed tokens and those the sampler accepted."""
        with self._lock:
            self.proposed_tokens += proposed
            self.accepted_tokens += accepted

    def forget(self, session: str) -> None:
        """A session was deleted."""
        with self._lock:
            self.last.pop(session, None)

    def histograms(self) -> tuple[Histogram, ...]:
        """The latency histograms, for the node's metrics collector."""
        return (self.ttft, self.prefill, self.decode, self.restore, self.queue)

    def counters(self) -> dict[str, int]:
        """Totals since start: turns, prompt and reused tokens, slot evictions, speculatively
        proposed and accepted tokens."""
        with self._lock:
            return {
                "turns": self.turns, "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens, "slot_evictions": self.slot_evictions,
                "proposed_tokens": self.proposed_tokens,
                "accepted_tokens": self.accepted_tokens,
            }

    def misses_by_reason(self) -> dict[str, int]:
        """Turns that reused less than their whole prompt, by the first word of the reason."""
        with self._lock:
            return dict(self.misses)
