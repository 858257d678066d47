"""Grammars that force a reply's shape: JSON responses and tool calls, in llguidance's terms.

Admission uses ``check_enforceable`` to refuse (400, naming the feature) a schema the
grammar cannot enforce before anything is recorded; the engine uses ``grammar_for`` to build
the grammar of a turn and enforces it while sampling (``actors/engine/grammar.py``).

JSON is generated compact with the separators ``json.dumps`` writes (``", "``, ``": "``), so
a forced call's arguments are already in the canonical form the templates render, and the
streamed argument text equals the arguments ``done`` carries.

Schemas are read as OpenAI's strict mode reads them (``closed_schema``): an object that
declares ``properties`` and says nothing of other keys admits only the keys it declares, so
a weak model cannot pad a call with keys of its own until ``max_tokens``. A schema opts out
per object with ``additionalProperties: true``, or whole with ``strict: false``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import NamedTuple

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


_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties",
              "allOf", "anyOf", "oneOf", "$ref")
"""Keywords by which an object says what it admits beyond its declared properties, or by
which other subschemas may declare more keys of the same object (closing it would refuse
theirs)."""
_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else",
              "additionalProperties", "propertyNames", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas")


def closed_schema(schema: JsonSchema) -> JsonSchema:
    """``schema`` with ``additionalProperties: false`` on every object that declares
    ``properties`` (every key it requires among them) and none of ``_OPEN_KEYS``: OpenAI's
    strict semantics.

    ``allOf`` members are left open at their own level: closing each would refuse the keys
    the others declare (their nested objects are closed). ``anyOf``/``oneOf`` members are
    alternatives, each closed.
    """
    return _closed(schema, close=True)  # type: ignore[return-value]


def _closed(node: object, close: bool) -> object:
    if isinstance(node, list):  # an ``items`` list (tuples, older drafts)
        return [_closed(n, True) for n in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if out.get("propertyNames") == {"type": "string"}:
        # Every JSON key is a string, so this says nothing, and llguidance has no
        # propertyNames: zod's records (Claude Code's tools) write it on every map.
        del out["propertyNames"]
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = _closed(out[key], True)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(n, True) for n in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [_closed(n, False) for n in out["allOf"]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _closed(v, True) for k, v in out[key].items()}
    if close and _declares_all(node) and not any(k in node for k in _OPEN_KEYS):
        out["additionalProperties"] = False
    return out


def _declares_all(node: dict[str, object]) -> bool:
    """Whether ``node`` declares ``properties`` and each key it requires is one of them (a
    required key declared nowhere would make the closed object unsatisfiable)."""
    props, required = node.get("properties"), node.get("required", [])
    return isinstance(props, dict) and isinstance(required, list) and all(
        k in props for k in required
    )


def _strict(schema: JsonSchema, strict: bool | None) -> JsonSchema:
    """The schema the grammar enforces: closed unless the request said ``strict: false``."""
    return schema if strict is False else closed_schema(schema)


def response_grammar(fmt: JsonObjectFormat | JsonSchemaFormat) -> str:
    """The grammar of a JSON response."""
    schema: JsonSchema = {"type": "object"}
    if isinstance(fmt, JsonSchemaFormat):
        _within_bounds(fmt.json_schema.schema_, "response_format")
        schema = _strict(fmt.json_schema.schema_, fmt.json_schema.strict)
    return llguidance.LLMatcher.grammar_from_json_schema(_with_options(schema))


def _within_bounds(schema: JsonSchema, where: str) -> None:
    """Refuse a schema past the bounds here too: one recorded before they held would crash
    the engine's compile on every turn."""
    problem = schema_bounds_problem(schema)
    if problem:
        raise InferError(
            ErrorCode.BAD_REQUEST, f"{where}: the schema cannot be enforced: {problem}"
        )


def _call_schema(tool: Tool) -> dict[str, object]:
    params = dict(_strict(tool.function.parameters, tool.function.strict))
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
    for tool in tools:
        _within_bounds(tool.function.parameters, f"tool {tool.function.name}")
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


SCHEMA_MAX_DEPTH = 128
"""Most nested objects and arrays along any path of a schema, each ``$ref`` followed counted
as one more. llguidance compiles a schema recursively in native code, ~3 KiB of stack a
level: a chain of ~2,300 references overflows an 8 MiB thread stack and kills the process."""
SCHEMA_MAX_NODES = 20_000
"""Most objects and arrays in a schema (every ``$ref`` target counted once)."""

_DONE = object()


def _ref_target(ref: object, root: object) -> object:
    """The container a local ``$ref`` (``#/...``) names, or None."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _children(node: object, root: object) -> list[object]:
    values = list(node.values()) if isinstance(node, dict) else list(node)  # type: ignore[union-attr]
    if isinstance(node, dict) and "$ref" in node:
        values.append(_ref_target(node["$ref"], root))
    return [v for v in values if isinstance(v, dict | list)]


def schema_bounds_problem(schema: JsonSchema) -> str:
    """Why ``schema`` is too deep or too large to compile (naming the limit), or ``""``.

    An iterative walk (it cannot overflow a stack itself) that visits each container once:
    a reference back into the path being walked (a recursive schema) adds no depth.
    """
    too_deep = (f"it nests more than {SCHEMA_MAX_DEPTH} levels deep (objects, arrays and "
                "$ref hops along one path)")
    heights: dict[int, int] = {}
    path: list[tuple[object, list[object], int]] = [(schema, _children(schema, schema), 0)]
    on_path = {id(schema)}
    while path:
        if len(path) > SCHEMA_MAX_DEPTH:
            return too_deep
        node, todo, best = path[-1]
        child = todo.pop() if todo else _DONE
        if child is _DONE:
            path.pop()
            on_path.discard(id(node))
            heights[id(node)] = best + 1
            if path:
                parent, rest, parent_best = path[-1]
                path[-1] = (parent, rest, max(parent_best, best + 1))
            continue
        if id(child) in heights or id(child) in on_path:
            # A part met again is not walked again, but its depth counts from here too: the
            # compiler may meet it here first.
            if len(path) + heights.get(id(child), 0) > SCHEMA_MAX_DEPTH:
                return too_deep
            path[-1] = (node, todo, max(best, heights.get(id(child), 0)))
            continue
        if len(heights) + len(path) >= SCHEMA_MAX_NODES:
            return f"it has more than {SCHEMA_MAX_NODES} objects and arrays"
        on_path.add(id(child))
        path.append((child, _children(child, schema), 0))
    return ""


def schema_source(schema: JsonSchema) -> str:
    """The text llguidance compiles for ``schema`` (also the key its verdict is kept by)."""
    return json.dumps(_with_options(schema), sort_keys=True)


def compile_problem(source: str) -> str:
    """llguidance's verdict on a ``schema_source``: why it cannot be enforced, or ``""``.

    Native code: run it only on a schema within the bounds, where a crash is contained."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(source)
        return llguidance.LLMatcher.validate_grammar(grammar).strip()
    except Exception as e:  # llguidance raises on what it cannot even parse
        return str(e).strip() or repr(e)


@functools.lru_cache(maxsize=256)
def _schema_problem(source: str) -> str:
    return compile_problem(source)


def schema_problem(schema: JsonSchema) -> str:
    """Why the grammar cannot enforce ``schema`` (llguidance's words, or the bound it
    passes), or ``""``; compiled in this process."""
    return schema_bounds_problem(schema) or _schema_problem(schema_source(schema))


class SchemaQuestion(NamedTuple):
    """One schema of a prompt the grammar must be able to enforce."""

    schema: JsonSchema
    """The schema."""
    where: str
    """How the refusal names it."""
    details: dict[str, str]
    """The refusal's details (``param``, and ``tool``)."""

    def refusal(self, problem: str) -> InferError:
        """The 400 refusing the prompt for ``problem``."""
        return InferError(ErrorCode.BAD_REQUEST, f"{self.where}: {problem}", self.details)


def schema_questions(prompt: PromptRequest) -> list[SchemaQuestion]:
    """The schemas of ``prompt`` the grammar would compile, as it would read them (closed
    unless ``strict: false``): tools' parameters, then the response format's. Bodies nest at
    most ``MAX_JSON_DEPTH`` levels, so closing one cannot exhaust the stack."""
    questions = [
        SchemaQuestion(
            _strict(tool.function.parameters, tool.function.strict),
            f"tools[{i}] ({tool.function.name}): its parameters schema cannot be enforced "
            "when the call is forced",
            {"tool": tool.function.name, "param": f"tools.{i}.function.parameters"},
        )
        for i, tool in enumerate(prompt.tools or ())
    ]
    fmt = prompt.response_format
    if isinstance(fmt, JsonSchemaFormat):
        questions.append(SchemaQuestion(
            _strict(fmt.json_schema.schema_, fmt.json_schema.strict),
            "response_format: the schema cannot be enforced",
            {"param": "response_format.json_schema.schema"},
        ))
    return questions


def check_enforceable(prompt: PromptRequest) -> None:
    """Raise ``bad_request`` naming the first schema feature the grammar cannot enforce
    (compiled in this process; admission compiles in ``actors.schema_worker``)."""
    for question in schema_questions(prompt):
        problem = schema_problem(question.schema)
        if problem:
            raise question.refusal(problem)
