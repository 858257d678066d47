"""Anthropic's Messages API request as the gateway accepts it, and its translation into the
chat-completions request the rest of the gateway runs.

Claude Code and the ``anthropic`` SDK send content blocks: ``text``, ``tool_use`` (an
assistant's call) and ``tool_result`` (a user's answer to one) map onto OpenAI's messages,
``tool_calls`` and ``tool`` messages, so a conversation is indexed, forked and cached exactly
as the OpenAI door's is. ``image`` and ``document`` blocks are refused with a 400 naming the
block (this node serves a text model); ``thinking`` blocks, ``cache_control`` marks and the
``thinking`` option are accepted and ignored, as are ``context_management`` (server-side
clearing of old blocks) and Anthropic's server tools (a tool whose ``type`` is not
``custom``): the node cannot run them. A ``system`` message inside ``messages`` (Claude Code
sends one after the first user message) stays a system message at its place, as the chat door
keeps one, so the conversation's prefix, and its cache, is the same turn after turn; the
model's chat template renders it. Any other unknown field is a 400 naming it, so a typo never
silently does nothing.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from actors.gateway.wire import ChatCompletionRequest, check_request, invalid_body
from schemas.errors import ErrorCode, InferError
from schemas.json_depth import check_json_depth

MAX_TOKENS = 32_768
"""Most tokens one answer may ask for here; Claude Code asks for more, and is given this."""


class _Strict(BaseModel):
    """Unknown keys are refused; documented but unused ones are declared and ignored."""

    model_config = ConfigDict(extra="forbid")


class TextBlock(_Strict):
    """A ``text`` block."""

    type: Literal["text"]
    """Always ``text``."""
    text: str
    """The text."""
    cache_control: dict[str, Any] | None = None
    """Anthropic's prompt-cache mark; ignored (every prefix is cached here)."""
    citations: Any = None
    """Echoed by clients; ignored."""


class MediaBlock(BaseModel):
    """An ``image`` or ``document`` block: refused, this node serves a text model."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image", "document"]
    """The kind of media."""


class ToolUseBlock(_Strict):
    """An assistant's ``tool_use`` block, as the client sends it back."""

    type: Literal["tool_use"]
    """Always ``tool_use``."""
    id: str
    """The call's id."""
    name: str
    """The tool called."""
    input: dict[str, Any]
    """The call's arguments."""
    cache_control: dict[str, Any] | None = None
    """Ignored."""
    caller: Any = None
    """Echoed by the SDK (who made the call); ignored."""
    toolset_name: str | None = None
    """Echoed by the SDK; ignored."""


class ToolResultBlock(_Strict):
    """A user's ``tool_result`` block: the answer to one call."""

    type: Literal["tool_result"]
    """Always ``tool_result``."""
    tool_use_id: str
    """The call answered."""
    content: str | list[Annotated[TextBlock | MediaBlock, Field(discriminator="type")]] = ""
    """The result: text, or text blocks."""
    is_error: bool | None = None
    """The tool failed; the text says how."""
    cache_control: dict[str, Any] | None = None
    """Ignored."""


class ThinkingBlock(BaseModel):
    """A ``thinking`` block another model wrote; ignored (this node never writes one)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["thinking", "redacted_thinking"]
    """The kind of thinking block."""


Block = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | MediaBlock | ThinkingBlock,
    Field(discriminator="type"),
]


class Message(_Strict):
    """One message of ``messages``."""

    role: Literal["user", "assistant", "system"]
    """Who speaks; Claude Code puts ``system`` messages inside ``messages`` too."""
    content: str | list[Block]
    """Text, or content blocks."""


class CustomTool(_Strict):
    """A tool the client runs: its name, description and input schema."""

    type: Literal["custom"] | None = None
    """``custom`` or absent."""
    name: str
    """Tool name."""
    description: str | None = None
    """What the tool does, for the model."""
    input_schema: dict[str, Any]
    """JSON Schema of the tool's input object."""
    cache_control: dict[str, Any] | None = None
    """Ignored."""


class ServerTool(BaseModel):
    """One of Anthropic's server tools (web search, code execution, ...): skipped."""

    model_config = ConfigDict(extra="allow")
    type: str
    """Its versioned type, e.g. ``web_search_20250305``."""


def _tool_kind(v: Any) -> str:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return "custom" if kind in (None, "custom") else "server"


ToolParam = Annotated[
    Annotated[CustomTool, Tag("custom")] | Annotated[ServerTool, Tag("server")],
    Discriminator(_tool_kind),
]


class ToolChoiceParam(_Strict):
    """``tool_choice``: auto, any (some tool), tool (this one) or none."""

    type: Literal["auto", "any", "tool", "none"]
    """How tools may be used."""
    name: str | None = None
    """For ``tool``: the tool that must be called."""
    disable_parallel_tool_use: bool | None = None
    """At most one call."""


class Metadata(_Strict):
    """``metadata``."""

    user_id: str | None = None
    """The end user; a conversation's affinity hint here (``sessions.affinity_hint``)."""


class JsonFormat(_Strict):
    """``output_config.format``: the answer is JSON valid for ``schema``."""

    type: Literal["json_schema"]
    """Always ``json_schema``."""
    schema_: dict[str, Any] = Field(alias="schema")
    """The JSON Schema (enforced by a grammar)."""


class OutputConfig(_Strict):
    """``output_config``."""

    effort: str | None = None
    """How hard the model should think; ignored (the node has one way to answer)."""
    format: JsonFormat | None = None
    """Structured output."""


class Conversation(_Strict):
    """What ``/v1/messages/count_tokens`` takes: a conversation, its system prompt, tools."""

    model: str
    """Any name; it is echoed back, and the node answers with the model it loaded."""
    messages: Annotated[list[Message], Field(min_length=1, max_length=4096)]
    """The conversation; the last message is the one to answer."""
    system: str | list[TextBlock] | None = None
    """The system prompt."""
    tools: Annotated[list[ToolParam], Field(max_length=128)] | None = None
    """Tools; server tools are skipped."""
    tool_choice: ToolChoiceParam | None = None
    """How tools may be used."""
    thinking: dict[str, Any] | None = None
    """Extended thinking; ignored (the answer is the model's plain reply)."""
    cache_control: dict[str, Any] | None = None
    """Anthropic's automatic prompt caching; ignored (every prefix is cached here)."""
    output_config: OutputConfig | None = None
    """``format`` asks for JSON of a schema; ``effort`` is ignored."""
    context_management: dict[str, Any] | None = None
    """Which old thinking blocks and tool results Anthropic may clear server-side; ignored
    (thinking blocks are dropped anyway, and clearing tool results would change a prefix the
    cache reuses)."""

    def sampling(self) -> dict[str, Any]:
        """The chat-completions fields that shape the answer (none for a count)."""
        return {}


class MessagesRequest(Conversation):
    """``POST /v1/messages``."""

    max_tokens: Annotated[int, Field(ge=1)]
    """Most tokens of the answer (at most ``MAX_TOKENS`` are generated)."""
    stop_sequences: list[str] | None = None
    """Strings that end the answer."""
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    """Sampling temperature; 0 is greedy."""
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """Nucleus sampling mass."""
    top_k: Annotated[int, Field(ge=0)] | None = None
    """Keep the k most likely tokens."""
    stream: bool = False
    """Answer as server-sent events."""
    metadata: Metadata | None = None
    """``user_id``: an affinity hint."""
    service_tier: str | None = None
    """Ignored."""
    speed: str | None = None
    """Ignored."""
    inference_geo: str | None = None
    """Ignored (the node answers where it runs)."""
    container: Any = None
    """The code-execution container of a server tool; ignored."""
    diagnostics: dict[str, Any] | None = None
    """Ignored."""
    user_profile_id: str | None = None
    """Ignored."""
    workspace_id: str | None = None
    """Ignored."""

    def sampling(self) -> dict[str, Any]:
        """The chat-completions fields that shape the answer."""
        fields = {"max_tokens": min(self.max_tokens, MAX_TOKENS), "stream": self.stream,
                  "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                  "stop": self.stop_sequences}
        return {k: v for k, v in fields.items() if v is not None}


R = TypeVar("R", bound=Conversation)


def parse_messages(body: bytes) -> MessagesRequest:
    """A ``/v1/messages`` request, or a 400 naming what is wrong."""
    return _parse(MessagesRequest, body)


def parse_count(body: bytes) -> Conversation:
    """A ``/v1/messages/count_tokens`` request, or a 400 naming what is wrong."""
    return _parse(Conversation, body)


def _parse(model: type[R], body: bytes) -> R:
    check_json_depth(body, "the request body")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise invalid_body(e, body) from e


def to_chat_request(req: Conversation) -> ChatCompletionRequest:
    """The request in chat-completions form: the same conversation, tools and sampling."""
    body: dict[str, Any] = {
        "model": req.model, "messages": _messages(req), **req.sampling(),
    }
    tools = [t for t in req.tools or () if isinstance(t, CustomTool)]
    if tools:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, "parameters": t.input_schema,
            **({"description": t.description} if t.description is not None else {}),
        }} for t in tools]
    if req.tool_choice is not None:
        body.update(_tool_choice(req.tool_choice))
    if req.output_config is not None and req.output_config.format is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "response", "schema": req.output_config.format.schema_}}
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise invalid_body(e, json.dumps(body).encode()) from e
    check_request(chat)
    return chat


def _tool_choice(choice: ToolChoiceParam) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if choice.type == "tool":
        if not choice.name:
            raise InferError(ErrorCode.BAD_REQUEST, "tool_choice.name: a tool choice of type "
                             "tool names the tool", {"param": "tool_choice.name"})
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if choice.disable_parallel_tool_use is not None:
        out["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    return out


def _messages(req: Conversation) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": _text(req.system, "system")})
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
        elif m.role == "system":
            out.append({"role": "system", "content": _text(m.content, f"messages.{i}.content")})
        elif m.role == "assistant":
            out.append(_assistant(m.content, f"messages.{i}.content"))
        else:
            out.extend(_user(m.content, f"messages.{i}.content"))
    return out


def _assistant(blocks: list[Any], where: str) -> dict[str, Any]:
    texts, calls = [], []
    for j, b in enumerate(blocks):
        if isinstance(b, TextBlock):
            texts.append(b.text)
        elif isinstance(b, ToolUseBlock):
            calls.append({"id": b.id, "type": "function", "function": {
                "name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
        elif not isinstance(b, ThinkingBlock):
            _refuse(b, f"{where}.{j}", "an assistant message")
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _user(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """Tool results become ``tool`` messages, runs of text blocks user messages, in order."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, b in enumerate(blocks):
        if isinstance(b, TextBlock):
            texts.append(b.text)
            continue
        if not isinstance(b, ToolResultBlock):
            _refuse(b, f"{where}.{j}", "a user message")
        if texts:
            out.append({"role": "user", "content": "\n".join(texts)})
            texts = []
        text = _text(b.content, f"{where}.{j}.content")
        out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                    "content": f"Error: {text}" if b.is_error else text})
    if texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _text(content: str | list[Any], where: str) -> str:
    if isinstance(content, str):
        return content
    for j, b in enumerate(content):
        if not isinstance(b, TextBlock):
            _refuse(b, f"{where}.{j}", "this content")
    return "\n".join(b.text for b in content)


def _refuse(block: Any, where: str, place: str) -> None:
    kind = getattr(block, "type", "?")
    why = ("this node serves a text model; send the content as text"
           if kind in ("image", "document") else f"it cannot be part of {place}")
    raise InferError(ErrorCode.BAD_REQUEST, f"{where}: {kind} blocks are not accepted here: "
                     f"{why}", {"param": where})
