"""OpenAI function tools, the tool choice, the response format, and streamed tool-call deltas.

A tool's ``parameters`` must be a valid JSON Schema (checked with ``jsonschema`` when the
prompt is parsed); whether a schema can also be enforced by the grammar is checked by the
node (``actors/engine/constraints.py``), which names any feature it cannot enforce.
"""

from __future__ import annotations

from typing import Annotated, Literal

import jsonschema
from pydantic import ConfigDict, Field, JsonValue, field_validator

from schemas.chat import Frozen

FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
"""OpenAI's rule for function names."""
JsonSchema = dict[str, JsonValue]
"""A JSON Schema, as a JSON object."""


def check_json_schema(schema: JsonSchema) -> JsonSchema:
    """``schema`` if it is a valid JSON Schema (by its ``$schema`` draft, else 2020-12)."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "the top level"
        raise ValueError(f"not a valid JSON Schema at {where}: {e.message}") from None
    return schema


class FunctionDef(Frozen):
    """A function the model may call."""

    name: FunctionName
    """Function name (letters, digits, ``_``, ``.``, ``-``; at most 64)."""
    description: Annotated[str, Field(max_length=65_536)] | None = None
    """What the function does, for the model (agents write long ones: Claude Code's
    longest is about 19k characters)."""
    parameters: JsonSchema = {"type": "object", "properties": {}}
    """JSON Schema of the arguments object."""
    strict: bool | None = None
    """Forced calls always follow the schema, read as OpenAI's strict mode reads it (an
    object that declares ``properties`` admits no other key unless it says
    ``additionalProperties``); ``false`` reads it as plain JSON Schema instead."""

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, v: JsonSchema) -> JsonSchema:
        return check_json_schema(v)


class Tool(Frozen):
    """An OpenAI function tool."""

    type: Literal["function"] = "function"
    """Always ``function``."""
    function: FunctionDef
    """The function."""


class NamedFunction(Frozen):
    """The function a named tool choice forces."""

    name: FunctionName
    """Its name; it must be one of the session's tools."""


class NamedToolChoice(Frozen):
    """``{"type": "function", "function": {"name": ...}}``: this function must be called."""

    type: Literal["function"] = "function"
    """Always ``function``."""
    function: NamedFunction
    """The function."""


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice
"""``auto``: the model may call tools; ``none``: replies are text, never parsed as calls;
``required``: one call to some tool is forced; named: one call to that tool is forced."""


class JsonSchemaSpec(Frozen):
    """The schema a ``json_schema`` response must validate against."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", serialize_by_alias=True, validate_by_name=True
    )

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "response"
    """Name of the format."""
    description: Annotated[str, Field(max_length=8192)] | None = None
    """What the response is, for the model."""
    schema_: JsonSchema = Field(default={}, alias="schema")
    """The JSON Schema (``schema`` on the wire)."""
    strict: bool | None = None
    """The grammar always enforces the schema, read as OpenAI's strict mode reads it (no
    undeclared keys in an object that declares ``properties`` and says nothing of others);
    ``false`` reads it as plain JSON Schema instead."""

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, v: JsonSchema) -> JsonSchema:
        return check_json_schema(v)


class TextFormat(Frozen):
    """Free text (the default)."""

    type: Literal["text"] = "text"
    """Always ``text``."""


class JsonObjectFormat(Frozen):
    """Any JSON object."""

    type: Literal["json_object"] = "json_object"
    """Always ``json_object``."""


class JsonSchemaFormat(Frozen):
    """JSON that validates against a schema."""

    type: Literal["json_schema"] = "json_schema"
    """Always ``json_schema``."""
    json_schema: JsonSchemaSpec
    """The schema."""


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]
"""OpenAI's ``response_format``; JSON formats are enforced by a grammar while decoding."""


def forced_tool(choice: ToolChoice | None) -> bool:
    """Whether ``choice`` forces a tool call."""
    return choice == "required" or isinstance(choice, NamedToolChoice)


def constrains_output(fmt: TextFormat | JsonObjectFormat | JsonSchemaFormat | None) -> bool:
    """Whether ``fmt`` asks for JSON."""
    return fmt is not None and fmt.type != "text"


class FunctionDelta(Frozen):
    """A piece of a streamed call: the name once, then pieces of the arguments text."""

    name: str | None = None
    """The function name, in the first delta of a call only."""
    arguments: str = ""
    """The next piece of the arguments' JSON text."""


class ToolCallDelta(Frozen):
    """OpenAI's streamed ``tool_calls`` item."""

    index: int
    """Which call of the turn, from 0."""
    id: str | None = None
    """The call id, in the first delta of a call only (``done`` carries the same id)."""
    type: Literal["function"] | None = None
    """``function`` in the first delta of a call only."""
    function: FunctionDelta
    """The piece."""
