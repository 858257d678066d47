"""Operator request-reply messages on ``<prefix>.admin.*``."""

from __future__ import annotations

from typing import Literal

from schemas.chat import Frozen


class SessionRequest(Frozen):
    """Names one session (``admin.session`` and ``admin.delete``)."""

    type: Literal["session_request.v1"] = "session_request.v1"
    """Message type and version."""
    session: str
    """The session."""


class HealthReply(Frozen):
    """Is the node serving, and with what."""

    type: Literal["health.v1"] = "health.v1"
    """Message type and version."""
    status: Literal["ok", "degraded"]
    """``degraded`` when snapshots are off."""
    engine: str
    """Engine name."""
    model: str
    """Model description."""
    n_ctx: int
    """Context length of a slot."""
    slots: int
    """Number of slots."""
    snapshots: bool
    """Whether KV snapshots are on."""
    snapshot_note: str
    """Why snapshots are on or off."""
    sessions: int
    """Sessions held."""
    uptime_s: float
    """Seconds since start."""
    bank_tiers: tuple[str, ...] = ()
    """Tiers of the bank under the slots: ``ram``, then ``dir`` and/or ``object_store``."""


class BankEntryInfo(Frozen):
    """A bank entry, without its bytes."""

    tokens: int
    """Tokens it holds."""
    token_hash: str
    """sha256 of those token ids."""
    nbytes: int
    """Size."""
    hits: int
    """Restores."""
    created: float
    """Unix time of the snapshot."""
    last_access: float
    """Unix time of the last restore."""
    tier: str = "ram"
    """Where it is held: ``ram``, ``durable`` or ``ram+durable``."""
    model_id: str = ""
    """Model the state belongs to (another model never restores it)."""


class SessionSummary(Frozen):
    """One session."""

    session: str
    """The session."""
    generation: int
    """Committed generation."""
    records: int
    """Messages in the committed history."""
    pending: int
    """Recorded prompts not yet answered."""
    busy: bool
    """A turn is running."""
    slot: int | None
    """Resident slot, if any."""
    bank: tuple[BankEntryInfo, ...]
    """Bank entries."""
    last_cache_source: str | None = None
    """Where the last turn's reused prefix came from: slot, bank or none."""
    last_miss_reason: str | None = None
    """Why the last turn reused nothing or only part (None: a full hit)."""
    last_cached_tokens: int = 0
    """Prompt tokens the last turn reused."""
    last_prompt_tokens: int = 0
    """Prompt tokens of the last turn."""


class SessionsReply(Frozen):
    """Every session."""

    type: Literal["sessions.v1"] = "sessions.v1"
    """Message type and version."""
    sessions: tuple[SessionSummary, ...]
    """The sessions."""


class HistoryItemInfo(Frozen):
    """A record of a session's log, for reading."""

    kind: str
    """user, turn_start, assistant, provisional, commit, abort, delete."""
    id: str
    """Record id."""
    role: str | None = None
    """Role of the message, for message records."""
    content: str | None = None
    """Text, for message records."""
    turn_id: str | None = None
    """The turn, where one applies."""
    generation: int | None = None
    """For commits."""
    supersedes: str | None = None
    """For commits of a retried turn."""
    reason: str | None = None
    """For aborts."""
    status: str | None = None
    """For assistant/provisional: committed or ABORTED."""
    in_window: bool | None = None
    """For messages: False once the model no longer sees it (it left the context window);
    the log keeps it all the same."""


class HistoryReply(Frozen):
    """The record log of one session."""

    type: Literal["history.v1"] = "history.v1"
    """Message type and version."""
    session: str
    """The session."""
    generation: int
    """Committed generation."""
    records: tuple[HistoryItemInfo, ...]
    """The records, oldest first."""


class Percentiles(Frozen):
    """A latency distribution over recent turns, in milliseconds."""

    count: int
    """Samples in the window."""
    p50: float
    """Median."""
    p90: float
    """90th percentile."""
    p99: float
    """99th percentile."""
    max: float
    """Largest sample."""


class MetricsReply(Frozen):
    """Counters and distributions of the node."""

    type: Literal["metrics.v1"] = "metrics.v1"
    """Message type and version."""
    counters: dict[str, float]
    """Named counters and gauges."""
    prefix_hit_ratio: float = 0.0
    """Prompt tokens reused from a slot or the bank ÷ all prompt tokens."""
    evictions: int = 0
    """Slots handed to another session plus bank entries dropped for space."""
    latency: dict[str, Percentiles] = {}
    """ttft_ms, decode_ms_per_token, restore_ms, prefill_ms_per_token."""


class DeleteReply(Frozen):
    """Reply to ``admin.delete``: the session, its records closed and its bank entries gone."""

    type: Literal["delete.v1"] = "delete.v1"
    """Message type and version."""
    session: str
    """The deleted session."""
    deleted: bool = True
    """Always true; failures are error replies."""
