"""The OpenAI Responses API request (``POST /v1/responses``) and its translation into the
chat-completions request the gateway already runs.

A Responses request is a chat completion in other clothes: ``instructions`` is the system
message, ``input`` items are messages (``function_call`` items are an assistant's tool calls,
``function_call_output`` items are ``tool`` messages), flat function tools are chat tools,
``text.format`` is ``response_format`` and ``max_output_tokens`` is ``max_tokens``. So the
request is translated once and then checked and run exactly as a chat completion is.

What has no meaning for a text model on this node is accepted and ignored: ``reasoning``
items, hosted tool types (``web_search``, ``file_search``, ``local_shell``, ``custom``, and
Codex's ``namespace`` of sub-agent tools, ...: the model is never offered them, so it never
calls them), ``include``, ``reasoning``,
``truncation``, ``service_tier``. Fields OpenAI does not document are refused with 400
naming the field, as the chat door does.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from actors.gateway.wire import ChatCompletionRequest, parse_request
from schemas.chat import ChatMessage, FunctionCall, ToolCall
from schemas.errors import ErrorCode, InferError
from schemas.json_depth import check_json_depth


class _Strict(BaseModel):
    """Top-level fields: an unknown one is refused (a typo never silently does nothing)."""

    model_config = ConfigDict(extra="forbid")


class _Echoed(BaseModel):
    """Items and tools the SDKs echo back with extra fields (ids, statuses): extras ignored."""

    model_config = ConfigDict(extra="ignore")


class ContentPart(_Echoed):
    """One part of a message's content; only text means something to a text model."""

    type: Literal["input_text", "output_text", "text", "refusal"]
    """``input_text`` (the client's), ``output_text`` (an answer echoed back), ``refusal``."""
    text: str = ""
    """The text."""
    refusal: str = ""
    """A refusal's text (echoed answers only)."""


class MessageItem(_Echoed):
    """A message item (``type`` may be left out, as in OpenAI's easy input messages)."""

    type: Literal["message"] = "message"
    """Always ``message``."""
    role: Literal["user", "assistant", "system", "developer"]
    """Who speaks; ``developer`` is a system message."""
    content: str | list[ContentPart]
    """Text, or text parts."""

    def text(self) -> str:
        """The message's text."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text or p.refusal for p in self.content)


class FunctionCallItem(_Echoed):
    """A call the model made, as the client sends it back."""

    type: Literal["function_call"]
    """Always ``function_call``."""
    call_id: str
    """The call's id, which its output names."""
    name: str
    """The function called."""
    arguments: str = "{}"
    """JSON arguments, as a string."""


class FunctionCallOutputItem(_Echoed):
    """The result of a call."""

    type: Literal["function_call_output"]
    """Always ``function_call_output``."""
    call_id: str
    """The call answered."""
    output: str | list[ContentPart]
    """The result: text, or text parts."""


class DroppedItem(_Echoed):
    """A reasoning item: this node keeps no hidden reasoning, so it is dropped."""

    type: Literal["reasoning"]
    """Always ``reasoning``."""


def _item_kind(item: Any) -> str:
    kind = item.get("type", "message") if isinstance(item, dict) else "message"
    return f"item:{kind}"


InputItem = Annotated[
    Annotated[MessageItem, Tag("item:message")]
    | Annotated[FunctionCallItem, Tag("item:function_call")]
    | Annotated[FunctionCallOutputItem, Tag("item:function_call_output")]
    | Annotated[DroppedItem, Tag("item:reasoning")],
    Discriminator(_item_kind),
]
"""One item of ``input``."""


class FunctionTool(_Strict):
    """A function tool, flat as the Responses API writes it."""

    type: Literal["function"]
    """Always ``function``."""
    name: str
    """Function name."""
    description: str | None = None
    """What the function does, for the model."""
    parameters: dict[str, Any] | None = None
    """JSON Schema of the arguments object."""
    strict: bool | None = None
    """Forced calls always follow the schema; ``false`` admits keys it does not declare
    (see ``schemas.tools.FunctionDef.strict``)."""


class HostedTool(_Echoed):
    """Any other tool type (``web_search``, ``local_shell``, ``custom``, ...): ignored."""

    type: str
    """The tool type."""


def _tool_kind(tool: Any) -> str:
    function = isinstance(tool, dict) and tool.get("type") == "function"
    return "tool:function" if function else "tool:other"


AnyTool = Annotated[
    Annotated[FunctionTool, Tag("tool:function")] | Annotated[HostedTool, Tag("tool:other")],
    Discriminator(_tool_kind),
]
"""One entry of ``tools``."""


class FunctionChoice(_Strict):
    """``{"type": "function", "name": ...}``: this function must be called."""

    type: Literal["function"]
    """Always ``function``."""
    name: str
    """The function."""


class TextFormat(_Strict):
    """``text.format``: ``text``, ``json_object``, or ``json_schema`` with its schema flat."""

    type: Literal["text", "json_object", "json_schema"]
    """The format."""
    name: str | None = None
    """The schema's name (``json_schema``)."""
    description: str | None = None
    """What the answer is, for the model (``json_schema``)."""
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    """The JSON Schema (``json_schema``)."""
    strict: bool | None = None
    """Accepted; the grammar always enforces the schema."""


class TextConfig(_Strict):
    """``text``."""

    format: TextFormat | None = None
    """The answer's format."""
    verbosity: str | None = None
    """Ignored."""


class ResponsesRequest(_Strict):
    """``POST /v1/responses``."""

    model: str | None = None
    """Any name; the node serves the model it loaded."""
    input: str | Annotated[list[InputItem], Field(min_length=1, max_length=4096)]
    """A user message's text, or items."""
    instructions: str | None = None
    """The system message of this response (not carried over to the next one)."""
    previous_response_id: str | None = None
    """The stored response this one continues: ``input`` holds only the new items."""
    tools: Annotated[list[AnyTool], Field(max_length=256)] | None = None
    """Function tools; other tool types are ignored."""
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    """``auto``, ``none``, ``required`` or one named function."""
    parallel_tool_calls: bool | None = None
    """Passed on; every call the model makes is returned."""
    text: TextConfig | None = None
    """The answer's format."""
    max_output_tokens: Annotated[int, Field(ge=1, le=32_768)] | None = None
    """Most tokens of the answer."""
    temperature: float | None = None
    """Sampling temperature; 0 is greedy."""
    top_p: float | None = None
    """Nucleus sampling mass."""
    stream: bool = False
    """Answer as server-sent events."""
    stream_options: dict[str, Any] | None = None
    """Ignored."""
    store: bool = True
    """Keep the response so a later request can continue it by id."""
    prompt_cache_key: str | None = None
    """An affinity hint: requests with one key go to one session."""
    metadata: dict[str, str] | None = None
    """Echoed on the response."""
    user: str | None = None
    """Passed on."""
    safety_identifier: str | None = None
    """Ignored."""
    include: list[str] | None = None
    """Ignored (nothing optional is produced)."""
    reasoning: dict[str, Any] | None = None
    """Ignored (no hidden reasoning)."""
    truncation: Literal["auto", "disabled"] | None = None
    """Ignored: the session's overflow policy decides."""
    service_tier: str | None = None
    """Ignored."""
    background: Literal[False] | None = None
    """Background responses are not offered; only false is accepted."""
    max_tool_calls: int | None = None
    """Ignored."""
    top_logprobs: Literal[0] | None = None
    """Log probabilities are not returned; only 0 is accepted."""
    prompt_cache_retention: str | None = None
    """Ignored (sessions keep their state as the node's retention decides)."""
    client_metadata: dict[str, str] | None = None
    """Codex's own tags of the request; ignored."""

    def function_tools(self) -> list[FunctionTool]:
        """The tools the model may call."""
        return [t for t in self.tools or () if isinstance(t, FunctionTool)]


def parse_responses_request(body: bytes) -> ResponsesRequest:
    """The request, or a 400 naming the first field that is wrong."""
    check_json_depth(body, "the request body")
    try:
        return ResponsesRequest.model_validate_json(body)
    except ValidationError as e:
        # ``input`` is a string or items; for items, the string member's complaint is noise.
        errors = e.errors()
        first = next((x for x in errors if "str" not in x["loc"]), errors[0])
        where = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))
        what = {"extra_forbidden": "is not a field of this API",
                "union_tag_invalid": "this item type is not supported: send message, "
                "function_call, function_call_output or reasoning items"}.get(
                    first["type"], first["msg"])
        raise InferError(ErrorCode.BAD_REQUEST, f"the request is not valid: {where}: {what}",
                         {"param": where}) from e


def _is_union_tag(part: int | str) -> bool:
    # pydantic names the union member it tried in the location ("item:message", "str",
    # "FunctionChoice", "literal[...]"); those are not fields of the body.
    return isinstance(part, str) and (
        ":" in part or "[" in part or part == "str" or part[:1].isupper())


def input_messages(req: ResponsesRequest) -> list[ChatMessage]:
    """The request's ``input`` as chat messages: consecutive calls join the assistant
    message before them, as a chat client sends one assistant message with its calls."""
    if isinstance(req.input, str):
        return [ChatMessage(role="user", content=req.input)]
    out: list[ChatMessage] = []
    for i, item in enumerate(req.input):
        try:
            _add_item(out, item)
        except ValidationError as e:
            raise InferError(ErrorCode.BAD_REQUEST, f"input.{i}: {e.errors()[0]['msg']}",
                             {"param": f"input.{i}"}) from e
    return out


def _add_item(out: list[ChatMessage], item: Any) -> None:
    if isinstance(item, MessageItem):
        role = "system" if item.role == "developer" else item.role
        out.append(ChatMessage(role=role, content=item.text()))
    elif isinstance(item, FunctionCallItem):
        call = ToolCall(id=item.call_id,
                        function=FunctionCall(name=item.name, arguments=item.arguments))
        last = out[-1] if out else None
        if last is not None and last.role == "assistant":
            out[-1] = ChatMessage(role="assistant", content=last.content,
                                  tool_calls=(*(last.tool_calls or ()), call))
        else:
            out.append(ChatMessage(role="assistant", content="", tool_calls=(call,)))
    elif isinstance(item, FunctionCallOutputItem):
        text = item.output if isinstance(item.output, str) else "\n".join(
            p.text for p in item.output)
        out.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=text))


def chat_request(
    req: ResponsesRequest, messages: list[ChatMessage]
) -> ChatCompletionRequest:
    """The chat completion that runs ``messages`` with the request's tools and sampling,
    checked as the chat door checks its own requests."""
    body: dict[str, Any] = {
        "model": req.model, "messages": [_wire_message(m) for m in messages],
        "max_tokens": req.max_output_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "parallel_tool_calls": req.parallel_tool_calls, "user": req.user,
    }
    tools = req.function_tools()
    if tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(
            exclude={"type"}, exclude_none=True)} for t in tools]
    choice = req.tool_choice
    if isinstance(choice, FunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None and (tools or choice != "auto"):
        body["tool_choice"] = choice
    fmt = req.text.format if req.text else None
    if fmt is not None:
        body["response_format"] = _response_format(fmt)
    clean = {k: v for k, v in body.items() if v is not None}
    try:
        return parse_request(json.dumps(clean, ensure_ascii=False).encode())
    except InferError as e:
        raise _in_responses_terms(e, req) from e


def _in_responses_terms(e: InferError, req: ResponsesRequest) -> InferError:
    """The chat door's refusal, naming the field as this request spells it."""
    param = str(e.details.get("param", ""))
    head, _, rest = param.partition(".")
    if head == "tools" and rest.split(".")[0].isdigit():
        n, _, field_ = rest.partition(".")
        at = [i for i, t in enumerate(req.tools or ()) if isinstance(t, FunctionTool)][int(n)]
        named = ".".join(p for p in ("tools", str(at), field_.removeprefix("function."))
                         if p)
    elif head == "response_format":
        named = "text.format" + rest.removeprefix("json_schema")
    else:
        named = {"messages": "input", "max_tokens": "max_output_tokens"}.get(head, param)
    if not param or named == param:
        return e
    return InferError(e.code, e.message.replace(param, named, 1),
                      {**e.details, "param": named})


def _response_format(fmt: TextFormat) -> dict[str, Any]:
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    spec = {"name": fmt.name, "description": fmt.description, "schema": fmt.schema_ or {},
            "strict": fmt.strict}
    return {"type": "json_schema",
            "json_schema": {k: v for k, v in spec.items() if v is not None}}


def _wire_message(m: ChatMessage) -> dict[str, Any]:
    """A chat message as a chat-completions client writes it."""
    return m.model_dump(exclude_none=True)
