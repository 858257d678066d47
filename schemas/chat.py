"""Chat content in the OpenAI message shape, and sampling parameters."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

MAX_TEXT = 1_000_000
"""Longest text of one message, in characters."""

OverflowPolicy = Literal["refuse", "truncate", "shift"]
"""What a turn does when the session's history outgrows the context window: ``refuse``
answers ``context_overflow`` 422; ``truncate`` leaves the oldest whole turns out of the
window; ``shift`` also keeps the KV state of what stays where the engine can move it."""


class Frozen(BaseModel):
    """Base of every wire model: immutable, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class FunctionCall(Frozen):
    """The function a tool call invokes."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    """Function name."""
    arguments: Annotated[str, Field(max_length=MAX_TEXT)] = "{}"
    """Arguments as a JSON object encoded in a string (OpenAI's convention)."""


class ToolCall(Frozen):
    """One tool call made by the assistant."""

    id: Annotated[str, Field(min_length=1, max_length=128)]
    """Call id; the tool result names it in ``tool_call_id``."""
    type: Literal["function"] = "function"
    """Always ``function``."""
    function: FunctionCall
    """What is called."""


class ChatMessage(Frozen):
    """One message of a conversation.

    OpenAI's newer shapes are read into the plain one: role ``developer`` is a ``system``
    message, and content given as a list of ``{"type": "text", "text": ...}`` parts is their
    texts joined by newlines (the join llama.cpp's server and vLLM use for text parts).
    """

    role: Literal["system", "user", "assistant", "tool"]
    """Who speaks (``developer`` is read as ``system``)."""
    content: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    """Text of the message (or a list of text parts); may be empty for an assistant turn
    that only calls tools."""
    name: Annotated[str, Field(max_length=128)] | None = None
    """Optional speaker name."""
    tool_calls: tuple[ToolCall, ...] | None = None
    """Tool calls of an assistant message."""
    tool_call_id: Annotated[str, Field(max_length=128)] | None = None
    """For role ``tool``: the call this message answers."""

    @model_validator(mode="before")
    @classmethod
    def _read_openai_shapes(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("role") == "developer":
            data["role"] = "system"
        parts = data.get("content")
        if isinstance(parts, list):
            if not parts:
                raise ValueError("content is an empty list of parts: send text")
            data["content"] = "\n".join(_text_of_part(p) for p in parts)
        return data

    @model_validator(mode="after")
    def _check_shape(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.content is None and not self.tool_calls:
            raise ValueError("a message needs content or tool_calls")
        return self


def _text_of_part(part: object) -> str:
    """The text of one content part; any other kind of part is refused, naming its type."""
    if not isinstance(part, dict) or part.get("type") != "text":
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise ValueError(
            f"content part of type {kind!r} is not supported: send text parts "
            '({"type": "text", "text": ...})'
        )
    extra = set(part) - {"type", "text"}
    if extra:
        raise ValueError(f"content part field {sorted(extra)[0]!r} is not supported")
    text = part.get("text")
    if not isinstance(text, str):
        raise ValueError("a text content part needs \"text\" as a string")
    return text


class SamplingParams(Frozen):
    """How the next tokens are chosen (strict types: "0.5" or true for a number is refused)."""

    temperature: Annotated[float, Strict(), Field(ge=0.0, le=5.0)] = 0.7
    """0 means greedy (deterministic)."""
    top_k: Annotated[int, Strict(), Field(ge=0, le=100_000)] = 40
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: Annotated[float, Strict(), Field(gt=0.0, le=1.0)] = 0.95
    """Nucleus sampling mass."""
    repeat_penalty: Annotated[float, Strict(), Field(ge=0.5, le=2.0)] = 1.1
    """Penalty on tokens among the last ``repeat_last_n`` (1.0 = off)."""
    repeat_last_n: Annotated[int, Strict(), Field(ge=0, le=4096)] = 64
    """How many recent tokens the penalties look at."""
    frequency_penalty: Annotated[float, Strict(), Field(ge=-2.0, le=2.0)] = 0.0
    """Subtracted from a token's logit once per use among the last ``repeat_last_n`` (OpenAI's)."""
    presence_penalty: Annotated[float, Strict(), Field(ge=-2.0, le=2.0)] = 0.0
    """Subtracted from the logit of every token used among the last ``repeat_last_n``."""
    seed: Annotated[int, Strict(), Field(ge=0, le=2**63 - 1)] | None = None
    """Seed of the sampler; same seed and history give the same text."""


class PromptTokensDetails(Frozen):
    """OpenAI's breakdown of the prompt tokens."""

    cached_tokens: int = 0
    """Prompt tokens whose KV state was reused (the same as ``Usage.cached_tokens``)."""


class Usage(Frozen):
    """Token counts of one turn (infernode's own fields and OpenAI's)."""

    prompt_tokens: int
    """Tokens of the rendered prompt."""
    cached_tokens: int
    """Prompt tokens whose KV state was reused (slot or bank)."""
    new_prefill_tokens: int
    """Prompt tokens evaluated this turn."""
    completion_tokens: int
    """Tokens generated."""
    dropped_tokens: int = 0
    """Prompt tokens of the history left out of the context window (the log keeps them)."""
    dropped_turns: int = 0
    """Whole turns of the history left out of the context window."""
    total_tokens: int = 0
    """``prompt_tokens + completion_tokens`` (filled in when not given)."""
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()
    """OpenAI's ``cached_tokens`` (filled in when not given)."""

    @model_validator(mode="before")
    @classmethod
    def _openai_fields(cls, data: object) -> object:
        # Derived, never sent separately by the engine; set so every reader sees OpenAI's shape.
        if isinstance(data, dict):
            data = dict(data)
            data.setdefault(
                "total_tokens", data.get("prompt_tokens", 0) + data.get("completion_tokens", 0)
            )
            cached = {"cached_tokens": data.get("cached_tokens", 0)}
            data.setdefault("prompt_tokens_details", cached)
        return data


class CacheInfo(Frozen):
    """Where the reused prefix came from, or why nothing was reused."""

    source: Literal["slot", "bank", "none"]
    """``slot``: the live context; ``bank``: a restored snapshot; ``none``: cold."""
    miss_reason: str | None = None
    """new_session, evicted, prefix_divergence_at_token N, template_mismatch, model_mismatch,
    corrupt (a snapshot read back failed its checksum and was dropped)."""
    restore_ms: float = 0.0
    """Time spent restoring a snapshot."""
    shared_from: Literal["ram", "durable"] | None = None
    """Set when the restored prefix was banked by another session (a shared system prompt):
    the bank tier it came from. None when the state was this session's own."""
    shared_tokens: int = 0
    """Prompt tokens reused from another session's snapshot (the shared prefix)."""
    shared_prefix: str | None = None
    """sha256 of the shared prefix's token ids (``tokens.token_hash``): which prefix it was."""


class Timings(Frozen):
    """Where the time of one turn went, in milliseconds."""

    queue_ms: float = 0.0
    """From admission to the start of the turn."""
    lock_wait_ms: float = 0.0
    """Waiting for a free slot."""
    tokenize_ms: float = 0.0
    """Template rendering and tokenisation."""
    restore_ms: float = 0.0
    """Restoring a banked snapshot."""
    prefill_ms: float = 0.0
    """Evaluating the new prompt tokens."""
    decode_ms: float = 0.0
    """Generating the reply."""
    ttft_ms: float = 0.0
    """From the start of the turn to the first token."""
    total_ms: float = 0.0
    """From the start of the turn to its end."""
