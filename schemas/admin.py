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


class MetricsReply(Frozen):
    """Counters and distributions of the node."""

    type: Literal["metrics.v1"] = "metrics.v1"
    """Message type and version."""
    counters: dict[str, float]
    """Named counters and gauges."""
