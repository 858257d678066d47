"""Every message that crosses the bus: prompts, events, internal requests, admin replies.

Each model is frozen, refuses unknown fields, and carries a versioned ``type`` literal.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import Field, Strict, model_validator

from schemas.chat import (
    CacheInfo,
    ChatMessage,
    Frozen,
    OverflowPolicy,
    SamplingParams,
    Timings,
    ToolCall,
    Usage,
)
from schemas.errors import ErrorCode
from schemas.tools import (
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCallDelta,
    ToolChoice,
    constrains_output,
    forced_tool,
)

SessionId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
FinishReason = Literal["stop", "length", "tool_calls", "aborted", "error"]


# -- agents → node ------------------------------------------------------------------------
_SAMPLING_ALIASES = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty")
"""OpenAI's top-level sampling fields, read into ``sampling``."""
OPENAI_ALIASES = frozenset({*_SAMPLING_ALIASES, "max_completion_tokens"})
"""OpenAI fields a prompt accepts that are read into other fields (not kept by name)."""


class PromptRequest(Frozen):
    """A prompt, published on ``<prefix>.prompt.<session>`` (or asked on ``<prefix>.ask.*``).

    OpenAI chat-completion bodies are read too: top-level ``temperature``, ``top_p``,
    ``seed``, ``frequency_penalty`` and ``presence_penalty`` go into ``sampling``,
    ``max_completion_tokens`` is ``max_tokens``, and ``stop`` may be one string. Giving one
    setting twice with two values is refused. Any other unknown field is refused by name.
    """

    type: Literal["prompt.v1"] = "prompt.v1"
    """Message type and version."""
    session: SessionId | None = None
    """Optional; must equal the subject's session when given."""
    messages: Annotated[tuple[ChatMessage, ...], Field(max_length=256)] = ()
    """Messages to append; empty asks for a turn over what is pending (a retry)."""
    expect_generation: Annotated[int, Strict(), Field(ge=0)] | None = None
    """Refuse (409) unless the session's committed generation equals this."""
    idempotency_key: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    """A retried publish with the same key is recorded once (also via ``Nats-Msg-Id``)."""
    sampling: SamplingParams = SamplingParams()
    """Sampling parameters of the reply."""
    stop: Annotated[tuple[Annotated[str, Field(min_length=1, max_length=64)], ...], Field(max_length=8)] = ()
    """Strings that end the reply (not included in it); one string or a list."""
    max_tokens: Annotated[int, Strict(), Field(ge=1, le=32_768)] = 256
    """Most tokens the reply may have (``max_completion_tokens`` is read as this)."""
    reply: Annotated[bool, Strict()] = True
    """False appends the messages without running a turn."""
    relay_to: SessionId | None = None
    """Another session that receives this turn's answer as a prompt (if it granted it)."""
    accept_relays_from: Annotated[tuple[SessionId, ...], Field(max_length=256)] | None = None
    """Sessions whose relayed answers this session accepts; replaces the earlier grant
    (``[]`` revokes all). Only who may publish to this session can grant, so a relay never
    reaches a session its sender could not write to."""
    relay_from: SessionId | None = None
    """Set by the node on a relayed answer: the session it comes from. It is recorded only
    when this session granted that source (``forbidden`` 403 otherwise)."""
    overflow: OverflowPolicy | None = None
    """When the history outgrows the context: ``refuse``, ``truncate`` or ``shift``; unset
    takes the node's ``--overflow``."""
    model: Annotated[str, Field(max_length=256)] | None = None
    """Accepted and not checked: a node serves the one model it loaded."""
    stream: Annotated[bool, Strict()] | None = None
    """Accepted; a turn's events always stream on ``<prefix>.events.<session>.*``."""
    n: Literal[1] = 1
    """Number of choices; only 1."""
    user: Annotated[str, Field(max_length=256)] | None = None
    """OpenAI's end-user id; accepted, not used."""
    parallel_tool_calls: Annotated[bool, Strict()] | None = None
    """False: the reply makes at most one tool call (a forced reply always makes one);
    unset or true: every call the model writes is parsed and returned."""
    tools: Annotated[tuple[Tool, ...], Field(max_length=128)] | None = None
    """The session's tool set from now on (replaces the previous set; ``[]`` clears it)."""
    tool_choice: ToolChoice | None = None
    """``auto`` (default), ``none``, ``required`` or a named function, for this reply."""
    response_format: ResponseFormat | None = None
    """``json_object`` or ``json_schema``: the reply is forced to such JSON by a grammar."""

    @model_validator(mode="before")
    @classmethod
    def _read_openai_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = {k: data.pop(k) for k in _SAMPLING_ALIASES if k in data}
        if given:
            sampling = data.get("sampling", {})
            if isinstance(sampling, SamplingParams):
                sampling = sampling.model_dump(exclude_unset=True)
            if isinstance(sampling, dict):
                data["sampling"] = _merge(dict(sampling), given, "sampling.")
        if "max_completion_tokens" in data:
            value = data.pop("max_completion_tokens")
            data.update(_merge(data, {"max_tokens": value}, "", "max_completion_tokens"))
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        return data

    @model_validator(mode="after")
    def _check_tools(self) -> PromptRequest:
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"tools: the function {dup!r} is declared twice")
        choice = self.tool_choice
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if named is not None and self.tools is not None and named not in names:
            raise ValueError(
                f"tool_choice: names the function {named!r}, which is not among the declared "
                f"tools ({', '.join(names) or 'none'})"
            )
        if forced_tool(choice) and constrains_output(self.response_format):
            raise ValueError(
                "response_format: a JSON response format cannot be combined with a forced tool "
                "call (tool_choice required or named); choose one"
            )
        return self

    def digest(self) -> str:
        """sha256 of what the prompt asks, its key and session left out: a retry's is equal."""
        body = self.model_dump_json(exclude={"session", "idempotency_key"})
        return hashlib.sha256(body.encode()).hexdigest()


def _merge(
    into: dict[str, Any], given: dict[str, Any], where: str, alias: str = ""
) -> dict[str, Any]:
    """``into`` with ``given`` set; a field already there with another value is refused."""
    for key, value in given.items():
        if key in into and into[key] != value:
            raise ValueError(
                f"{alias or key} ({value!r}) contradicts {where}{key} ({into[key]!r}): give it once"
            )
        into[key] = value
    return into


class AbortRequest(Frozen):
    """Request on ``<prefix>.abort.<session>``; an empty body is accepted too."""

    type: Literal["abort.v1"] = "abort.v1"
    """Message type and version."""
    reason: Annotated[str, Field(max_length=256)] = "client"
    """Why the turn is aborted, recorded with it."""


class AbortReply(Frozen):
    """Reply to an abort request."""

    type: Literal["abort_reply.v1"] = "abort_reply.v1"
    """Message type and version."""
    session: str
    """The session."""
    aborted: bool
    """True when a running turn was stopped."""
    turn_id: str | None = None
    """The turn that was stopped."""


# -- node → agents: events ----------------------------------------------------------------
class AcceptedEvent(Frozen):
    """The prompt is in the session's durable record log."""

    type: Literal["accepted.v1"] = "accepted.v1"
    """Message type and version."""
    session: str
    """The session."""
    message_ids: tuple[str, ...]
    """Record ids given to the prompt's messages; replies name them as parents."""
    generation: int
    """Committed generation when the prompt was recorded."""
    idempotency_key: str | None = None
    """The prompt's idempotency key, if any."""
    duplicate: bool = False
    """True when the prompt had already been recorded (a retried publish)."""


class StartedEvent(Frozen):
    """A turn began."""

    type: Literal["started.v1"] = "started.v1"
    """Message type and version."""
    session: str
    """The session."""
    turn_id: str
    """Id of the turn."""
    parent_ids: tuple[str, ...]
    """User message ids this turn answers."""
    generation: int
    """Committed generation the turn starts from."""


class TokenEvent(Frozen):
    """A piece of the reply's text."""

    type: Literal["token.v1"] = "token.v1"
    """Message type and version."""
    session: str
    """The session."""
    turn_id: str
    """Id of the turn."""
    index: int
    """Position of this piece in the turn, from 0."""
    text: str
    """Text of the piece (complete UTF-8)."""


class DoneEvent(Frozen):
    """The reply is complete (before it is committed)."""

    type: Literal["done.v1"] = "done.v1"
    """Message type and version."""
    session: str
    """The session."""
    turn_id: str
    """Id of the turn."""
    parent_ids: tuple[str, ...]
    """User message ids this turn answers."""
    text: str
    """Whole reply text (tool-call markup removed when calls were parsed)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Tool calls parsed from the reply."""
    finish_reason: FinishReason
    """Why generation stopped."""
    usage: Usage
    """Token counts."""
    cache: CacheInfo
    """Prefix reuse of this turn."""
    timings: Timings
    """Timing buckets."""
    stop_sequence: str | None = None
    """The prompt's stop string that ended the reply (``finish_reason`` stop), if one did."""


class ToolCallEvent(Frozen):
    """A piece of a tool call while it is generated (OpenAI's streamed ``tool_calls`` shape)."""

    type: Literal["tool_call.v1"] = "tool_call.v1"
    """Message type and version."""
    session: str
    """The session."""
    turn_id: str
    """Id of the turn."""
    tool_calls: tuple[ToolCallDelta, ...]
    """The delta: the name first (with the call id), then pieces of the arguments."""


class PromptProgressEvent(Frozen):
    """How far the prompt's prefill got, every few seconds while a long one runs (before
    the first token): a sign of life for clients that give up on a silent stream."""

    type: Literal["prompt_progress.v1"] = "prompt_progress.v1"
    """Message type and version."""
    session: str
    """The session."""
    turn_id: str
    """Id of the turn."""
    done: int = Field(ge=0)
    """Prompt tokens evaluated or reused so far."""
    total: int = Field(ge=0)
    """Prompt tokens of the turn."""
    cached: int = Field(ge=0)
    """Of those, tokens reused from the session's state without evaluation."""
    elapsed_ms: float = Field(ge=0)
    """Since the prefill began."""


class CommitEvent(Frozen):
    """The turn is committed to the record log."""

    type: Literal["commit.v1"] = "commit.v1"
    """Message type and version."""
    session: str
    """The session."""
    turn_id: str
    """Id of the turn."""
    generation: int
    """New committed generation."""
    record_id: str
    """Id of the assistant record."""
    parent_ids: tuple[str, ...]
    """User message ids the turn answered."""
    supersedes: str | None = None
    """Provisional record this commit replaces (a retry of an aborted turn)."""


class ProvisionalEvent(Frozen):
    """An aborted turn's partial reply, kept as an honest record."""

    type: Literal["provisional.v1"] = "provisional.v1"
    """Message type and version."""
    session: str
    """The session."""
    turn_id: str
    """Id of the turn."""
    record_id: str
    """Id of the provisional record."""
    parent_ids: tuple[str, ...]
    """User message ids the turn was answering."""
    text: str
    """Partial text."""
    finish_reason: Literal["aborted"] = "aborted"
    """Always ``aborted``."""


class AbortedEvent(Frozen):
    """The turn was aborted; the generation did not advance."""

    type: Literal["aborted.v1"] = "aborted.v1"
    """Message type and version."""
    session: str
    """The session."""
    turn_id: str
    """Id of the turn."""
    reason: str
    """Why."""
    generation: int
    """Committed generation (unchanged)."""
    provisional_id: str
    """The provisional record holding the partial text."""


class ErrorEvent(Frozen):
    """A typed error with a human sentence."""

    type: Literal["error.v1"] = "error.v1"
    """Message type and version."""
    session: str | None = None
    """The session, when one could be named."""
    code: ErrorCode
    """Error code."""
    status: int
    """HTTP-like status of the code."""
    message: str
    """What went wrong and how to fix it."""
    turn_id: str | None = None
    """The turn that failed, if any."""
    idempotency_key: str | None = None
    """The refused prompt's idempotency key, if any."""
    details: dict[str, str | int | float] = {}
    """Data for the client (e.g. the current generation on a conflict)."""


class StatusEvent(Frozen):
    """A session became busy or idle."""

    type: Literal["status.v1"] = "status.v1"
    """Message type and version."""
    session: str
    """The session."""
    state: Literal["busy", "idle"]
    """Busy while a turn runs."""
    generation: int
    """Committed generation."""
    pending: int
    """Recorded prompts not yet answered."""


# -- node → agents: the answer to an ask ----------------------------------------------------
class AnswerReply(Frozen):
    """The reply to ``<prefix>.ask.<session>``: the final answer of the turn that answered it.

    A failed ask gets an ``ErrorEvent`` instead (header ``Infer-Error``).
    """

    type: Literal["answer.v1"] = "answer.v1"
    """Message type and version."""
    session: str
    """The session."""
    turn_id: str
    """The turn that answered."""
    parent_ids: tuple[str, ...]
    """User message ids the turn answered (the ask's among them)."""
    text: str
    """Whole reply text (tool-call markup removed when calls were parsed)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Tool calls parsed from the reply."""
    finish_reason: FinishReason
    """Why generation stopped; ``aborted`` when the turn was aborted (text is partial)."""
    usage: Usage
    """Token counts."""
    generation: int
    """Committed generation after the turn (unchanged when it was aborted)."""
    record_id: str
    """The assistant record (committed) or the provisional record (aborted) in history."""
    model_id: str = ""
    """Identity of the model file that wrote the reply (its size and a hash of its head)."""
    cache: CacheInfo = CacheInfo(source="none")
    """Prefix reuse of the turn."""
    timings: Timings = Timings()
    """Timing buckets of the turn."""
