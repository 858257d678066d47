"""Operator request-reply messages on ``<prefix>.admin.*``."""

from __future__ import annotations

from typing import Literal

from schemas.chat import ChatMessage, Frozen
from schemas.tools import Tool


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
    node: str = ""
    """The answering node's id (several nodes may serve one NATS)."""
    members: tuple[str, ...] = ()
    """The live nodes as the answering node last read them (their membership keys): a
    client gathering every node's reply waits for these."""
    partitions: tuple[int, ...] = ()
    """The partitions of the sessions whose leases the answering node holds."""
    turns_in_flight: int = 0
    """Turns running on the node now (its active runners)."""
    slots_busy: int = 0
    """Engine slots running a turn now."""
    pending: int = 0
    """Recorded prompts waiting for a turn, over all its sessions (its queue)."""


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
    node: str = ""
    """The node serving the session."""


class SessionsReply(Frozen):
    """Every session."""

    type: Literal["sessions.v1"] = "sessions.v1"
    """Message type and version."""
    sessions: tuple[SessionSummary, ...]
    """The sessions."""
    node: str = ""
    """The answering node's id ("" when the sessions of several nodes were merged)."""
    members: tuple[str, ...] = ()
    """The live nodes as the answering node last read them (their membership keys): a
    client gathering every node's reply waits for these."""


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
    parent_ids: tuple[str, ...] = ()
    """For assistant, provisional and commit records: the user records the turn answers
    (an agent that missed the events finds the answer to its accepted ids here)."""


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


class MetricSample(Frozen):
    """One number of a metric family, as Prometheus exposes it."""

    name: str
    """Sample name: the family name, or with ``_bucket``/``_count``/``_sum`` for histograms."""
    labels: dict[str, str] = {}
    """Label values (``le`` for a histogram bucket's upper bound)."""
    value: float
    """The value, exact (no rounding)."""


class MetricFamily(Frozen):
    """A Prometheus metric family: name, type, help text and its samples."""

    name: str
    """Family name (``infernode_...``; counters without the ``_total`` their samples carry)."""
    kind: Literal["counter", "gauge", "histogram"]
    """Prometheus type."""
    help: str
    """What it measures."""
    samples: tuple[MetricSample, ...]
    """Its samples."""


class MetricsReply(Frozen):
    """The node's metrics: the same families its Prometheus endpoint serves."""

    type: Literal["metrics.v2"] = "metrics.v2"
    """Message type and version."""
    families: tuple[MetricFamily, ...]
    """Every metric family, counters, gauges and latency histograms in seconds."""
    node: str = ""
    """The answering node's id."""
    members: tuple[str, ...] = ()
    """The live nodes as the answering node last read them (their membership keys): a
    client gathering every node's reply waits for these."""

    def value(self, sample: str, **labels: str) -> float:
        """The value of ``sample`` with exactly these labels; 0 when it has not been seen."""
        for family in self.families:
            for s in family.samples:
                if s.name == sample and s.labels == labels:
                    return s.value
        return 0.0

    def total(self, sample: str) -> float:
        """The sum of ``sample`` over every label combination."""
        return sum(s.value for f in self.families for s in f.samples if s.name == sample)

    def quantile(self, histogram: str, q: float) -> float | None:
        """Estimate of the ``q`` quantile of a histogram, interpolated in its bucket.

        The same estimate PromQL's ``histogram_quantile`` makes; None with no observations.
        """
        buckets = sorted(
            (float(s.labels["le"]), s.value) for f in self.families if f.name == histogram
            for s in f.samples if s.name == f"{histogram}_bucket"
        )
        if not buckets or buckets[-1][1] == 0:
            return None
        rank = q * buckets[-1][1]
        lower, below = 0.0, 0.0
        for upper, count in buckets:
            if count >= rank:
                if upper == float("inf"):
                    return lower
                inside = count - below
                return lower + (upper - lower) * ((rank - below) / inside if inside else 0.0)
            lower, below = upper, count
        return lower


class DeleteReply(Frozen):
    """Reply to ``admin.delete``: the session, its records closed and its bank entries gone."""

    type: Literal["delete.v1"] = "delete.v1"
    """Message type and version."""
    session: str
    """The deleted session."""
    deleted: bool = True
    """Always true; failures are error replies."""


class ClusterHealth(Frozen):
    """Every node's health, gathered by the client from the nodes on one NATS."""

    type: Literal["cluster_health.v1"] = "cluster_health.v1"
    """Message type and version."""
    live: tuple[str, ...]
    """The live nodes (membership keys in the lease bucket) as the nodes that answered
    know them."""
    owners: dict[str, tuple[int, ...]]
    """Node → the partitions whose leases it holds, as each node answered."""
    nodes: tuple[HealthReply, ...]
    """The health of every node that answered, by node id."""
    missing: tuple[str, ...] = ()
    """Live nodes that did not answer before the deadline."""


class ClusterMetrics(Frozen):
    """Every node's metrics, gathered by the client from the nodes on one NATS."""

    type: Literal["cluster_metrics.v1"] = "cluster_metrics.v1"
    """Message type and version."""
    nodes: tuple[MetricsReply, ...]
    """The metrics of every node that answered, by node id."""
    missing: tuple[str, ...] = ()
    """Live nodes that did not answer before the deadline."""


class CountTokensRequest(Frozen):
    """A conversation to render and tokenise as a turn's prompt (``admin.count_tokens``)."""

    type: Literal["count_tokens.v1"] = "count_tokens.v1"
    """Message type and version."""
    messages: tuple[ChatMessage, ...]
    """The whole conversation, as a stateless prompt sends it."""
    tools: tuple[Tool, ...] = ()
    """The tools rendered with it."""


class CountTokensReply(Frozen):
    """How many tokens the prompt of a fresh turn over the conversation would hold."""

    type: Literal["count_tokens_reply.v1"] = "count_tokens_reply.v1"
    """Message type and version."""
    prompt_tokens: int
    """Tokens of the rendered prompt (the engine's own template and tokenizer)."""
