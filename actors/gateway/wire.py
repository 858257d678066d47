"""The OpenAI chat-completions request as the gateway accepts it, and its translation.

What the prompt subject takes maps 1:1: sampling fields, ``stop``, ``max_tokens``, ``tools``,
``tool_choice``, ``response_format``, and history with ``tool_calls`` and ``tool`` results.
OpenAI clients send more than infernode uses: fields OpenAI documents that change nothing
here (``user``, ``store``, ``logit_bias``, ...) are accepted and ignored; fields that would
change the answer in a way infernode cannot honour (``n`` > 1, ``logprobs``) and fields
OpenAI does not document are refused with 400 naming the field (``param``), so a typo never
silently does nothing.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.chat import MAX_TEXT, ChatMessage, FunctionCall, SamplingParams, ToolCall
from schemas.errors import ErrorCode, InferError
from schemas.json_depth import check_json_depth
from schemas.messages import PromptRequest
from schemas.tools import ResponseFormat, Tool, ToolChoice


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
    parsed_arguments: Any = None
    """Echoed by the SDKs' parse and stream helpers; ignored."""


class WireToolCall(_Lenient):
    """An assistant's tool call, as the client sends it back."""

    id: str
    """Call id."""
    type: Literal["function"] = "function"
    """Always ``function``."""
    function: WireFunction
    """What was called."""
    index: int | None = None
    """Echoed by the SDKs' stream helpers (a streamed call's position); ignored."""


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
    parsed: Any = None
    """Echoed by the SDKs' parse and stream helpers; ignored."""

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
    """Passed on; every call the model makes is returned."""
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    """Function tools; the request's set is the session's set for this turn."""
    tool_choice: ToolChoice | None = None
    """``auto``, ``none``, ``required`` or a named function (forced by a grammar)."""
    response_format: ResponseFormat | None = None
    """``text``, ``json_object`` or ``json_schema`` (JSON is enforced by a grammar)."""
    repeat_last_n: Annotated[int, Field(ge=0, le=4096)] | None = None
    """Extension: how many recent tokens the penalties look at."""

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
    check_json_depth(body, "the request body")
    try:
        req = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as e:
        raise InferError(
            ErrorCode.BAD_REQUEST, _sentence(e, body), {"param": _param(e, body)}
        ) from e
    check_request(req)
    return req


def check_request(req: ChatCompletionRequest) -> None:
    """What a valid model does not say alone: every tool result answers a call of the
    request, every message fits infernode's bounds (for requests another door translated)."""
    _check_tool_results(req.messages)
    _check_convertible(req.messages)


def invalid_body(e: ValidationError, body: bytes) -> InferError:
    """The 400 of a body that failed validation, naming the field as the body spells it
    (for any door's request model)."""
    first = e.errors()[0] if e.error_count() else None
    path = _body_path(first["loc"], body, first["type"] == "missing") if first else []
    return InferError(ErrorCode.BAD_REQUEST, _sentence(e, body), {"param": ".".join(path)})


def _check_convertible(messages: list[WireMessage]) -> None:
    """Every message fits infernode's own bounds (a text of at most ``MAX_TEXT`` characters,
    short names and ids): a 413 or 400 naming the field, not a failure further in."""
    for i, m in enumerate(messages):
        try:
            m.to_chat()
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in (f"messages.{i}", *first["loc"]))
            if first["type"] == "string_too_long":
                raise InferError(
                    ErrorCode.TOO_LARGE, f"{where} is longer than {MAX_TEXT} characters, the "
                    "most one message may hold; send less", {"param": where},
                ) from e
            raise InferError(ErrorCode.BAD_REQUEST, f"{where}: {first['msg']}",
                             {"param": where}) from e


def _check_tool_results(messages: list[WireMessage]) -> None:
    """Every ``tool`` message answers a call an earlier assistant message of the request made.

    Stateless clients resend the whole conversation, so the request itself is the history a
    result must belong to; a named session's node checks its own record log too.
    """
    calls: set[str] = set()
    for i, m in enumerate(messages):
        calls.update(c.id for c in m.tool_calls or ())
        if m.role == "tool" and m.tool_call_id not in calls:
            where = f"messages.{i}.tool_call_id"
            if m.tool_call_id is None:
                raise InferError(ErrorCode.BAD_REQUEST, f"{where}: a tool message needs the "
                                 "tool_call_id of the call it answers", {"param": where})
            raise InferError(
                ErrorCode.BAD_REQUEST,
                f"{where}: the tool message answers call {m.tool_call_id!r}, which no earlier "
                "assistant message of the conversation made",
                {"param": where},
            )


def prompt_for(
    req: ChatCompletionRequest, messages: tuple[ChatMessage, ...], key: str,
    expect_generation: int | None,
) -> PromptRequest:
    """The prompt that sends ``messages`` (the part the session has not seen).

    The request's tools are the session's tools for this turn (none when it has none): an
    OpenAI client states its whole tool set on every call.
    """
    base = SamplingParams()
    sampling = SamplingParams(
        temperature=base.temperature if req.temperature is None else req.temperature,
        top_p=req.top_p or base.top_p,
        top_k=base.top_k if req.top_k is None else req.top_k,
        repeat_penalty=req.repeat_penalty or base.repeat_penalty,
        repeat_last_n=base.repeat_last_n if req.repeat_last_n is None else req.repeat_last_n,
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
            user=req.user, tools=tuple(req.tools or ()), tool_choice=req.tool_choice,
            response_format=req.response_format, parallel_tool_calls=req.parallel_tool_calls,
        )
    except ValidationError as e:
        raise InferError(ErrorCode.BAD_REQUEST, _sentence(e), {"param": _param(e)}) from e


def _param(e: ValidationError, body: bytes = b"") -> str:
    """The request field an error is about, as OpenAI's ``param`` names it."""
    if not e.error_count():
        return ""
    first = e.errors()[0]
    fields = _body_path(first["loc"], body, first["type"] == "missing")
    if fields:
        return ".".join(fields)
    # A check across fields has no location; its sentence starts with the field it names.
    head = str(first.get("ctx", {}).get("error", "")).split(":", 1)[0]
    return head if head in ChatCompletionRequest.model_fields else ""


def _body_path(loc: tuple[int | str, ...], body: bytes, missing: bool) -> list[str]:
    """The part of ``loc`` that is a path in the request's JSON.

    pydantic puts the union member it tried into the location ("NamedToolChoice", a
    format's ``type`` tag, "function-after[...]"); those are not fields of the request.
    """
    try:
        node: object = json.loads(body) if body else None
    except ValueError:
        node = None
    path: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        ):
            node = node[part]  # type: ignore[index]
        elif node is None and isinstance(part, int | str) and str(part).isidentifier():
            pass  # no body to walk (a prompt's own check): keep plain field names
        elif not (missing and i == len(loc) - 1):
            continue
        path.append(str(part))
    return path


def _sentence(e: ValidationError, body: bytes = b"") -> str:
    parts = []
    for err in e.errors()[:3]:
        what = "is not a field of this API" if err["type"] == "extra_forbidden" else err["msg"]
        what = what.removeprefix("Value error, ")
        where = ".".join(_body_path(err.get("loc", ()), body, err["type"] == "missing"))
        parts.append(f"{where}: {what}" if where else what)
    more = f" (and {e.error_count() - 3} more)" if e.error_count() > 3 else ""
    return "the request is not valid: " + "; ".join(parts) + more
