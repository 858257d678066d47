"""The durable record log of a session (JetStream subject ``<prefix>.records.<session>``).

A session's state is rebuilt from these records after a restart: user messages, committed
assistant turns, provisional (aborted) turns, and the markers around them.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, TypeAdapter

from schemas.chat import ChatMessage, Frozen, OverflowPolicy, SamplingParams
from schemas.tools import ResponseFormat, Tool, ToolChoice

RERUN_REASONS = frozenset({"shutdown", "node_restart", "unavailable"})
"""Abort reasons after which the node runs the turn again by itself: the node stopped or
restarted, or the bus lost the engine's result. An agent waiting for its answer keeps
waiting (the ``aborted`` event of such a turn is followed by a new ``started``)."""
CRASH_LIMIT = 3
"""Times the node's death may cut a prompt's admission, or a turn over it, before the prompt
is set aside instead of tried again: a prompt that kills the node must not do so for ever."""


class ReplyParams(Frozen):
    """How a reply is generated: the one parameters object a turn carries whole, from the
    prompt's record through the runner's ``GenerateRequest`` to the engine's ``TurnSpec``."""

    sampling: SamplingParams = SamplingParams()
    """Sampling parameters."""
    stop: tuple[str, ...] = ()
    """Stop strings."""
    max_tokens: int = 256
    """Most tokens of the reply."""
    overflow: OverflowPolicy | None = None
    """The prompt's window policy; None takes the node's."""
    tool_choice: ToolChoice | None = None
    """How the reply may call the session's tools (``auto`` when absent)."""
    response_format: ResponseFormat | None = None
    """The JSON format the reply is forced into, if any."""
    parallel_tool_calls: bool | None = None
    """False: the reply makes at most one tool call (unset: as many as the model writes)."""

    @classmethod
    def of(cls, source: object, **more: object) -> Self:
        """The reply parameters ``source`` (a prompt, or a record's ``TurnParams``) holds, as
        this class, with ``more`` of its own fields."""
        return cls(**{name: getattr(source, name) for name in ReplyParams.model_fields}, **more)


class TurnParams(ReplyParams):
    """How a prompt asked to be answered; kept so a restarted node answers it alike: the
    reply's parameters and where its answer goes."""

    relay_to: str | None = None
    """Session that receives the answer as a prompt."""
    answer_to: str | None = None
    """Inbox of the ask that sent the prompt: the turn's answer is published there."""


class UserRecord(Frozen):
    """A message an agent sent (any role but assistant)."""

    type: Literal["record.user.v1"] = "record.user.v1"
    """Record type and version."""
    id: str
    """Record id; replies name it as a parent."""
    message: ChatMessage
    """The message."""
    intake_seq: int | None = None
    """Sequence of the prompt in the intake stream (redeliveries are recognised by it)."""
    idempotency_key: str | None = None
    """Idempotency key of the prompt."""
    prompt_digest: str | None = None
    """``PromptRequest.digest()`` of the prompt: the key reused for another prompt is refused."""
    reply: bool = True
    """Whether the prompt asked for a turn."""
    params: TurnParams = TurnParams()
    """How the reply was asked for."""
    ts: float
    """Unix time of recording."""


class ToolsRecord(Frozen):
    """The session's tool set from here on (a prompt that carried ``tools``)."""

    type: Literal["record.tools.v1"] = "record.tools.v1"
    """Record type and version."""
    id: str
    """Record id."""
    tools: tuple[Tool, ...]
    """The new set (it replaces the previous one; empty clears it)."""
    intake_seq: int | None = None
    """Sequence of the prompt in the intake stream."""
    ts: float
    """Unix time of recording."""


class TurnStartRecord(Frozen):
    """A turn began; one without a commit or abort after it was interrupted."""

    type: Literal["record.turn_start.v1"] = "record.turn_start.v1"
    """Record type and version."""
    id: str
    """The turn id."""
    parent_ids: tuple[str, ...]
    """User records it answers."""
    input_ids: tuple[str, ...] = ()
    """Every pending record the turn takes as input (answered or appended)."""
    ts: float
    """Unix time."""


class AssistantRecord(Frozen):
    """A completed assistant reply (committed by the following commit record)."""

    type: Literal["record.assistant.v1"] = "record.assistant.v1"
    """Record type and version."""
    id: str
    """Record id."""
    turn_id: str
    """The turn."""
    message: ChatMessage
    """The reply, with parsed tool calls."""
    parent_ids: tuple[str, ...]
    """User records it answers."""
    finish_reason: str
    """Why generation stopped."""
    token_ids: tuple[int, ...] | None = None
    """Exact generated token ids, so a later prompt reuses them token for token."""
    model_id: str | None = None
    """Model the token ids belong to."""
    ts: float
    """Unix time."""


class ProvisionalRecord(Frozen):
    """The partial reply of an aborted turn; never part of the committed history."""

    type: Literal["record.provisional.v1"] = "record.provisional.v1"
    """Record type and version."""
    id: str
    """Record id."""
    turn_id: str
    """The turn."""
    message: ChatMessage
    """The partial reply."""
    parent_ids: tuple[str, ...]
    """User records it was answering."""
    finish_reason: Literal["aborted"] = "aborted"
    """Always ``aborted``."""
    ts: float
    """Unix time."""


class CommitRecord(Frozen):
    """Commits an assistant record and advances the generation."""

    type: Literal["record.commit.v1"] = "record.commit.v1"
    """Record type and version."""
    id: str
    """Record id."""
    turn_id: str
    """The turn."""
    assistant_id: str
    """The assistant record committed."""
    generation: int
    """The new generation."""
    parent_ids: tuple[str, ...]
    """User records answered."""
    supersedes: str | None = None
    """A provisional record this commit replaces (retry of an aborted turn)."""
    window_from: str | None = None
    """First record (after the leading system messages) the model still saw this turn;
    the messages logged before it had left the context window. None: nothing had."""
    ts: float
    """Unix time."""


class AbortRecord(Frozen):
    """Marks a turn aborted; the generation stays."""

    type: Literal["record.abort.v1"] = "record.abort.v1"
    """Record type and version."""
    id: str
    """Record id."""
    turn_id: str
    """The turn."""
    provisional_id: str
    """The provisional record of the partial reply."""
    reason: str
    """Why (client, engine_error, node_restart, shutdown, …)."""
    ts: float
    """Unix time."""


class RelayGrantRecord(Frozen):
    """The sessions whose relayed answers this session accepts from now on."""

    type: Literal["record.relay_grant.v1"] = "record.relay_grant.v1"
    """Record type and version."""
    id: str
    """Record id."""
    sources: tuple[str, ...]
    """Granted source sessions; replaces the previous grant."""
    ts: float
    """Unix time."""


class DeleteRecord(Frozen):
    """The session was deleted; records before it are history no more."""

    type: Literal["record.delete.v1"] = "record.delete.v1"
    """Record type and version."""
    id: str
    """Record id."""
    ts: float
    """Unix time."""


Record = Annotated[
    UserRecord
    | ToolsRecord
    | TurnStartRecord
    | AssistantRecord
    | ProvisionalRecord
    | CommitRecord
    | AbortRecord
    | RelayGrantRecord
    | DeleteRecord,
    Field(discriminator="type"),
]
RECORD_ADAPTER: TypeAdapter[Record] = TypeAdapter(Record)
