"""Grammars that force a reply's shape: JSON responses and tool calls, in llguidance's terms.

Admission uses ``check_enforceable`` to refuse (400, naming the feature) a schema the
grammar cannot enforce before anything is recorded; the engine uses ``grammar_for`` to build
the grammar of a turn and enforces it while sampling (``actors/engine/grammar.py``).

JSON is generated compact with the separators ``json.dumps`` writes (``", "``, ``": "``), so
a forced call's arguments are already in the canonical form the templates render, and the
streamed argument text equals the arguments ``done`` carries.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import llguidance

from schemas.errors import ErrorCode, InferError
from schemas.messages import PromptRequest
from schemas.tools import (
    JsonObjectFormat,
    JsonSchema,
    JsonSchemaFormat,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolChoice,
    forced_tool,
)

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance JSON options: no free whitespace, ``json.dumps``'s separators."""
OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _with_options(schema: JsonSchema) -> dict[str, object]:
    return {**schema, "x-guidance": JSON_OPTIONS}


def response_grammar(fmt: JsonObjectFormat | JsonSchemaFormat) -> str:
    """The grammar of a JSON response."""
    schema: JsonSchema = {"type": "object"}
    if isinstance(fmt, JsonSchemaFormat):
        schema = fmt.json_schema.schema_
    return llguidance.LLMatcher.grammar_from_json_schema(_with_options(schema))


def _call_schema(tool: Tool) -> dict[str, object]:
    params = dict(tool.function.parameters)
    # References are written against the parameters' root; lifted to the call's root they
    # still resolve.
    defs: JsonSchema = {k: params.pop(k) for k in ("$defs", "definitions") if k in params}
    return _with_options({
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        **defs,
    })


def _marker(text: str, special_id: int | None) -> str:
    literal = json.dumps(text)
    return f"(<[{special_id}]> | {literal})" if special_id is not None else literal


def tool_call_grammar(
    tools: Sequence[Tool], choice: ToolChoice, open_id: int | None = None,
    close_id: int | None = None,
) -> str:
    """The grammar of exactly one hermes ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``.

    ``open_id``/``close_id`` are the model's own tokens for the tags, when it has them.
    """
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == choice.function.name]
    rules = [f"call{i}: %json {json.dumps(_call_schema(t))}" for i, t in enumerate(tools)]
    alternatives = " | ".join(f"call{i}" for i in range(len(tools)))
    lark = "\n".join([
        f"start: {_marker(OPEN, open_id)} ({alternatives}) {_marker(CLOSE, close_id)}", *rules,
    ])
    return llguidance.LLMatcher.grammar_from_lark(lark)


def grammar_for(
    tools: Sequence[Tool], choice: ToolChoice | None, fmt: ResponseFormat | None,
    open_id: int | None = None, close_id: int | None = None,
) -> str | None:
    """The grammar a turn must follow, or None for free text."""
    if forced_tool(choice) and tools:
        assert choice is not None
        return tool_call_grammar(tools, choice, open_id, close_id)
    if isinstance(fmt, JsonObjectFormat | JsonSchemaFormat):
        return response_grammar(fmt)
    return None


@functools.lru_cache(maxsize=256)
def _schema_problem(schema_json: str) -> str:
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_json)
    return llguidance.LLMatcher.validate_grammar(grammar)


def schema_problem(schema: JsonSchema) -> str:
    """Why the grammar cannot enforce ``schema`` (llguidance's words), or ``""``."""
    return _schema_problem(json.dumps(_with_options(schema), sort_keys=True)).strip()


def check_enforceable(prompt: PromptRequest) -> None:
    """Raise ``bad_request`` naming the first schema feature the grammar cannot enforce."""
    for i, tool in enumerate(prompt.tools or ()):
        problem = schema_problem(tool.function.parameters)
        if problem:
            raise InferError(
                ErrorCode.BAD_REQUEST,
                f"tools[{i}] ({tool.function.name}): its parameters schema cannot be enforced "
                f"when the call is forced: {problem}",
                {"tool": tool.function.name, "param": f"tools.{i}.function.parameters"},
            )
    fmt = prompt.response_format
    if isinstance(fmt, JsonSchemaFormat):
        problem = schema_problem(fmt.json_schema.schema_)
        if problem:
            raise InferError(
                ErrorCode.BAD_REQUEST,
                f"response_format: the schema cannot be enforced: {problem}",
                {"param": "response_format.json_schema.schema"},
            )
