"""Messages between the actors of one node (internal subjects)."""

from __future__ import annotations

from typing import Literal

from schemas.chat import (
    CacheInfo,
    ChatMessage,
    Frozen,
    Timings,
    ToolCall,
    Usage,
)
from schemas.errors import ErrorCode
from schemas.messages import FinishReason, PromptRequest
from schemas.records import ReplyParams
from schemas.tools import Tool


class ErrorBody(Frozen):
    """An error carried inside a reply."""

    code: ErrorCode
    """Error code."""
    message: str
    """Human sentence."""
    details: dict[str, str | int | float] = {}
    """Data for the client."""


class AdmitRequest(Frozen):
    """Admission → runner: record this prompt, then answer."""

    type: Literal["admit.v1"] = "admit.v1"
    """Message type and version."""
    session: str
    """The session (validated)."""
    prompt: PromptRequest
    """The validated prompt."""
    intake_seq: int | None = None
    """Stream sequence of the prompt in the intake stream."""
    idempotency_key: str | None = None
    """Key from the body or the ``Nats-Msg-Id`` header."""
    answer_to: str | None = None
    """Inbox of an ask (``Infer-Answer-To`` header) that receives the turn's answer."""
    received_at: float
    """Unix time admission received it."""


class AdmitReply(Frozen):
    """Runner → admission: the prompt's fate."""

    type: Literal["admit_reply.v1"] = "admit_reply.v1"
    """Message type and version."""
    outcome: Literal["recorded", "duplicate", "rejected"]
    """``recorded`` and ``duplicate`` may be acked; ``rejected`` carries an error."""
    message_ids: tuple[str, ...] = ()
    """Record ids of the prompt's messages."""
    generation: int = 0
    """Committed generation."""
    error: ErrorBody | None = None
    """Why it was rejected."""


class GenerateRequest(Frozen):
    """Runner → engine: run one turn over the session's window of its history."""

    type: Literal["generate.v4"] = "generate.v4"
    """Message type and version."""
    session: str
    """The session (its slot and bank entries)."""
    turn_id: str
    """Id of the turn."""
    messages: tuple[ChatMessage, ...]
    """Committed history plus the messages this turn answers, less the ``omitted`` ones."""
    omitted: int = 0
    """History messages right after the leading system messages that ``messages`` leaves
    out: they are before the recorded window, which never moves back, so a turn carries its
    window and not the whole log. ``window_start`` and the result's count them."""
    omitted_turns: int = 0
    """Whole turns among the ``omitted`` messages (they count in ``usage.dropped_turns``)."""
    assistant_tokens: dict[int, tuple[int, ...]] = {}
    """Exact token ids of assistant messages, by index in ``messages``."""
    model_id: str | None = None
    """Model those token ids belong to; other models ignore them."""
    generation: int = 0
    """The session's committed generation; 0 for a session that never had a turn (a cache
    miss is then ``new_session`` even when its messages include assistant turns)."""
    params: ReplyParams
    """How the reply is generated (the prompt's own, carried whole)."""
    window_start: int | None = None
    """Index in the conversation (``messages`` with the ``omitted`` ones) where the session's
    recorded window starts (after the system head); None leaves the window to the engine's
    own memory of the session."""
    token_subject: str
    """Where to publish token events as they are generated."""
    queue_ms: float
    """From the oldest answered prompt's recording to the turn's start, as the runner
    measured it (the one measure the log and the ``done`` event both report)."""
    tools: tuple[Tool, ...] = ()
    """The session's tool set, rendered into the prompt."""


class GenerateResult(Frozen):
    """Engine → runner: the outcome of a turn."""

    type: Literal["generate_result.v1"] = "generate_result.v1"
    """Message type and version."""
    session: str
    """The session."""
    turn_id: str
    """Id of the turn."""
    text: str = ""
    """Reply text (tool-call markup removed when calls were parsed)."""
    raw_text: str = ""
    """Reply text exactly as generated."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Parsed tool calls."""
    finish_reason: FinishReason = "stop"
    """Why generation stopped."""
    stop_sequence: str | None = None
    """The prompt's stop string that ended the reply, if one did."""
    usage: Usage = Usage(
        prompt_tokens=0, cached_tokens=0, new_prefill_tokens=0, completion_tokens=0
    )
    """Token counts."""
    cache: CacheInfo = CacheInfo(source="none")
    """Prefix reuse."""
    timings: Timings = Timings()
    """Timing buckets."""
    completion_ids: tuple[int, ...] | None = None
    """Generated token ids when they spell ``raw_text`` exactly."""
    model_id: str = ""
    """Model that generated them."""
    n_tokens: int = 0
    """Tokens in the slot after the turn (prompt + completion)."""
    token_hash: str = ""
    """sha256 of those token ids."""
    window_start: int = 0
    """Index in the request's conversation (its ``omitted`` messages counted) of the first
    message after the system head that the model still saw; the ones before it were left
    out of the window."""
    error: ErrorBody | None = None
    """Set when the turn failed."""


class CancelRequest(Frozen):
    """Runner → engine: stop the turn within one token."""

    type: Literal["cancel.v1"] = "cancel.v1"
    """Message type and version."""
    session: str
    """The session."""
    turn_id: str
    """The turn to stop (a stale cancel for another turn is ignored)."""


class CancelReply(Frozen):
    """Engine → runner: whether the cancel reached the named turn."""

    type: Literal["cancel_reply.v1"] = "cancel_reply.v1"
    """Message type and version."""
    cancelled: bool
    """True when the named turn was running and was told to stop."""


class TurnStatusRequest(Frozen):
    """Runner → engine: does this turn still run? (asked while its result is late)."""

    type: Literal["turn_status.v1"] = "turn_status.v1"
    """Message type and version."""
    session: str
    """The session."""
    turn_id: str
    """The turn asked about."""


class TurnStatusReply(Frozen):
    """Engine → runner: the state of the turn asked about."""

    type: Literal["turn_status_reply.v1"] = "turn_status_reply.v1"
    """Message type and version."""
    running: bool
    """True while the named turn runs in this engine."""


class SnapshotRequest(Frozen):
    """Bank committer → engine: bank the slot of a session once it is idle."""

    type: Literal["snapshot.v1"] = "snapshot.v1"
    """Message type and version."""
    session: str
    """The session."""
    generation: int
    """Generation the snapshot belongs to."""
    token_hash: str
    """The state expected in the slot; a mismatch means a newer turn ran, skip."""
    wait_s: float
    """How long to wait for the slot to be idle."""


class SnapshotReply(Frozen):
    """Engine → bank committer."""

    type: Literal["snapshot_reply.v1"] = "snapshot_reply.v1"
    """Message type and version."""
    stored: bool
    """True when a snapshot is now in the bank."""
    n_tokens: int = 0
    """Tokens in the snapshot."""
    nbytes: int = 0
    """Size of the snapshot."""
    ms: float = 0.0
    """Time taken to copy the state."""
    reason: str | None = None
    """Why nothing was stored."""


class BankCommitRequest(Frozen):
    """Runner → bank committer: a turn was committed; bank its KV state."""

    type: Literal["bank_commit.v1"] = "bank_commit.v1"
    """Message type and version."""
    session: str
    """The session."""
    turn_id: str
    """The committed turn."""
    generation: int
    """The new generation."""
    n_tokens: int
    """Tokens of the final state."""
    token_hash: str
    """sha256 of those token ids."""


class ForgetRequest(Frozen):
    """Runner → engine: a session was deleted; free its slot and bank entries."""

    type: Literal["forget.v1"] = "forget.v1"
    """Message type and version."""
    session: str
    """The session."""




class AdoptRequest(Frozen):
    """Runner host → engine: these sessions moved to this node (their partition was taken
    over); index the snapshots another node banked for them in the shared durable tier."""

    type: Literal["adopt.v1"] = "adopt.v1"
    """Message type and version."""
    sessions: tuple[str, ...]
    """The sessions that moved here."""


class AdoptReply(Frozen):
    """Engine → runner host: the moved sessions' durable snapshots are indexed."""

    type: Literal["adopt_reply.v1"] = "adopt_reply.v1"
    """Message type and version."""
    snapshots: int
    """Durable snapshots the engine knows of after indexing."""


class BankFlushRequest(Frozen):
    """Runner host → engine: these sessions go to another node; make the state of each one's
    last commit durable now, so the node taking them restores instead of recomputing."""

    type: Literal["bank_flush.v1"] = "bank_flush.v1"
    """Message type and version."""
    commits: dict[str, str]
    """Session → token-prefix hash of its last commit banked on this node."""
    wait_s: float
    """Longest wait for a busy slot, per session."""


class BankFlushReply(Frozen):
    """Engine → runner host: the sessions' snapshots are in the durable tier (or why not)."""

    type: Literal["bank_flush_reply.v1"] = "bank_flush_reply.v1"
    """Message type and version."""
    stored: int
    """Sessions whose last commit's state is durable now."""
    missed: dict[str, str] = {}
    """Session → why its state is not durable (its next turn recomputes)."""


class ForgetReply(Frozen):
    """Engine → runner host: the session's slot and bank entries are gone."""

    type: Literal["forget_reply.v1"] = "forget_reply.v1"
    """Message type and version."""
    session: str
    """The session that was forgotten."""


class SessionDeleteRequest(Frozen):
    """Admin → runner host: delete one session once its in-flight turn is recorded."""

    type: Literal["session_delete.v1"] = "session_delete.v1"
    """Message type and version."""
    session: str
    """The session to delete."""


class SessionDeleteReply(Frozen):
    """Runner host → admin: the session's deletion is recorded."""

    type: Literal["session_delete_reply.v1"] = "session_delete_reply.v1"
    """Message type and version."""
    session: str
    """The deleted session."""


class PartitionLease(Frozen):
    """The value of a partition's lease key: which node owns the partition now.

    The key's revision is the fencing token; the bucket's TTL ends a lease its owner stops
    renewing.
    """

    type: Literal["lease.v1"] = "lease.v1"
    """Message type and version."""
    node: str
    """The owning node's id."""
    partition: int
    """The partition owned."""


class NodeMember(Frozen):
    """The value of a node's membership key in the lease bucket: this node is alive.

    Renewed with the node's leases (the bucket's TTL ends it once the node stops renewing);
    every node counts the live members to compute its fair share of the partitions.
    """

    type: Literal["member.v1"] = "member.v1"
    """Message type and version."""
    node: str
    """The node's id."""
    since: float
    """Unix time the node joined (first wrote this key)."""
