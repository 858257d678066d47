"""The OpenAI chat-completions request as the gateway accepts it, and its translation.

OpenAI clients send more than infernode uses: fields OpenAI documents that change nothing
here (``user``, ``store``, penalties, ...) are accepted and ignored; fields that would change
the answer in a way infernode cannot honour (``n`` > 1, ``logprobs``) and fields OpenAI does
not document are refused with 400 naming the field, so a typo never silently does nothing.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.chat import ChatMessage, FunctionCall, SamplingParams, ToolCall
from schemas.errors import ErrorCode, InferError
from schemas.messages import PromptRequest


class _Lenient(BaseModel):
    """Unknown keys are refused; documented but unused ones are declared and ignored."""

    model_config = ConfigDict(extra="forbid")


class TextPart(_Lenient):
    """One part of a content array; only text means something to a text model."""

    type: Literal["text"]
    """Always ``text``."""
    text: str
    """The text."""


class WireFunction(_Lenient):
    """The function of a tool call, as the client sends it back."""

    name: str
    """Function name."""
    arguments: str = "{}"
    """JSON arguments, as a string."""


class WireToolCall(_Lenient):
    """An assistant's tool call, as the client sends it back."""

    id: str
    """Call id."""
    type: Literal["function"] = "function"
    """Always ``function``."""
    function: WireFunction
    """What was called."""


class WireMessage(_Lenient):
    """One message of ``messages``, with the extras OpenAI SDKs echo back."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    """Who speaks; ``developer`` is OpenAI's newer name for ``system``."""
    content: str | list[TextPart] | None = None
    """Text, or an array of text parts."""
    name: str | None = None
    """Optional speaker name."""
    tool_calls: list[WireToolCall] | None = None
    """Tool calls of an assistant message."""
    tool_call_id: str | None = None
    """For role ``tool``: the call answered."""
    refusal: str | None = None
    """Echoed by SDKs from a previous answer; ignored."""
    audio: Any = None
    """Echoed by SDKs; ignored."""
    annotations: Any = None
    """Echoed by SDKs; ignored."""
    function_call: Any = None
    """OpenAI's deprecated single call, echoed as null by SDKs; ignored."""

    def to_chat(self) -> ChatMessage:
        """The message in infernode's shape."""
        text = self.content
        if isinstance(text, list):
            text = "".join(part.text for part in text)
        calls = tuple(
            ToolCall(id=c.id, function=FunctionCall(name=c.function.name,
                                                    arguments=c.function.arguments))
            for c in self.tool_calls or ()
        )
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(
            role=role, content=text if text is not None or calls else "", name=self.name,
            tool_calls=calls or None, tool_call_id=self.tool_call_id,
        )


class StreamOptions(_Lenient):
    """``stream_options``."""

    include_usage: bool = False
    """Send a last chunk with the usage of the turn."""
    include_obfuscation: bool | None = None
    """OpenAI's padding of stream chunks; ignored."""


class ChatCompletionRequest(_Lenient):
    """``POST /v1/chat/completions``."""

    model: str | None = None
    """Any name; the node serves the model it loaded (see ``GET /v1/models``)."""
    messages: Annotated[list[WireMessage], Field(min_length=1, max_length=4096)]
    """The whole conversation (stateless clients) or its new part (a named session)."""
    stream: bool = False
    """Answer as server-sent events."""
    stream_options: StreamOptions | None = None
    """Streaming options."""
    max_tokens: Annotated[int, Field(ge=1, le=32_768)] | None = None
    """Most tokens of the answer."""
    max_completion_tokens: Annotated[int, Field(ge=1, le=32_768)] | None = None
    """Newer name of ``max_tokens``."""
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    """Sampling temperature; 0 is greedy."""
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """Nucleus sampling mass."""
    top_k: Annotated[int, Field(ge=0, le=100_000)] | None = None
    """Extension (llama.cpp servers accept it): keep the k most likely tokens."""
    repeat_penalty: Annotated[float, Field(ge=0.5, le=2.0)] | None = None
    """Extension: penalty on recently seen tokens."""
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    """Sampler seed."""
    stop: str | list[str] | None = None
    """Strings that end the answer."""
    n: Literal[1] = 1
    """Only one choice per request."""
    metadata: dict[str, str] | None = None
    """``session_id`` names a session, like the ``X-Session-Id`` header."""
    user: str | None = None
    """Ignored."""
    store: bool | None = None
    """Ignored."""
    service_tier: str | None = None
    """Ignored."""
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    """Penalty growing with how often a token already appeared."""
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    """Penalty on any token that already appeared."""
    logit_bias: dict[str, float] | None = None
    """Ignored."""
    logprobs: Literal[False] | None = None
    """Log probabilities are not returned; only false is accepted."""
    top_logprobs: Literal[0] | None = None
    """Only 0 is accepted."""
    parallel_tool_calls: bool | None = None
    """Ignored."""
    tools: list[dict[str, Any]] | None = None
    """Function tools (refused until the node's prompt carries them)."""
    tool_choice: str | dict[str, Any] | None = None
    """How tools are chosen (only ``none``/``auto`` while no tools are accepted)."""
    response_format: dict[str, Any] | None = None
    """Only ``{"type": "text"}`` until the node enforces formats."""

    @field_validator("stop")
    @classmethod
    def _at_most_eight(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 8:
            raise ValueError("at most 8 stop strings")
        return v

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        """Every message in infernode's shape."""
        return tuple(m.to_chat() for m in self.messages)

    def session_hint(self) -> str | None:
        """``metadata.session_id``, if any."""
        return (self.metadata or {}).get("session_id")


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The request, or a 400 naming what is wrong."""
    try:
        req = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as e:
        raise InferError(ErrorCode.BAD_REQUEST, _sentence(e), {"param": _param(e)}) from e
    if req.tools:
        raise InferError(
            ErrorCode.BAD_REQUEST, "this node does not take tools yet; send the request "
            "without `tools`", {"param": "tools"},
        )
    if req.tool_choice not in (None, "none", "auto"):
        raise InferError(
            ErrorCode.BAD_REQUEST, "tool_choice needs tools, which this node does not take "
            "yet", {"param": "tool_choice"},
        )
    if req.response_format not in (None, {"type": "text"}):
        raise InferError(
            ErrorCode.BAD_REQUEST, "only response_format {\"type\": \"text\"} is served yet",
            {"param": "response_format"},
        )
    return req


def prompt_for(
    req: ChatCompletionRequest, messages: tuple[ChatMessage, ...], key: str,
    expect_generation: int | None,
) -> PromptRequest:
    """The prompt that sends ``messages`` (the part the session has not seen)."""
    base = SamplingParams()
    sampling = SamplingParams(
        temperature=base.temperature if req.temperature is None else req.temperature,
        top_p=req.top_p or base.top_p,
        top_k=base.top_k if req.top_k is None else req.top_k,
        repeat_penalty=req.repeat_penalty or base.repeat_penalty,
        frequency_penalty=req.frequency_penalty or base.frequency_penalty,
        presence_penalty=req.presence_penalty or base.presence_penalty,
        seed=req.seed,
    )
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    max_tokens = req.max_completion_tokens or req.max_tokens
    try:
        return PromptRequest(
            messages=messages, sampling=sampling, stop=stop,
            max_tokens=max_tokens or PromptRequest.model_fields["max_tokens"].default,
            idempotency_key=key, expect_generation=expect_generation, model=req.model,
            user=req.user,
        )
    except ValidationError as e:
        raise InferError(ErrorCode.BAD_REQUEST, _sentence(e), {"param": _param(e)}) from e


def _param(e: ValidationError) -> str:
    first = e.errors()[0] if e.error_count() else {}
    return ".".join(str(x) for x in first.get("loc", ()) if not str(x).startswith("function-"))


def _sentence(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        where = ".".join(str(x) for x in err.get("loc", ())) or "body"
        what = "is not a field of this API" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {what}")
    more = f" (and {e.error_count() - 3} more)" if e.error_count() > 3 else ""
    return "the request is not valid: " + "; ".join(parts) + more
