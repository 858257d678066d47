"""Constrained decoding: the grammar, not the model, makes the random model's output valid.

The tiny model has random weights, so without a grammar its text is noise (checked here
too); twenty sampled replies under a schema that all parse and validate prove the
constraint itself, on each engine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from actors.engine.backends.llamacpp.backend import llama_cpp_available
from actors.engine.constraints import check_enforceable, schema_problem
from actors.engine.interface import CancelToken, TurnSpec
from actors.engine.loader import load_engine
from actors.engine.sampling import Sampler
from actors.engine.templates.chat import parse_tool_calls
from actors.engine.templates.tool_stream import ToolCallStream
from node.config import NodeConfig
from schemas.chat import ChatMessage, SamplingParams
from schemas.errors import InferError
from schemas.messages import PromptRequest
from schemas.records import ReplyParams
from schemas.tools import JsonSchemaFormat

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "count": {"type": "integer", "minimum": 0, "maximum": 500},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["red", "green"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["city", "count", "ok", "kind", "tags"],
    "additionalProperties": False,
}
ENGINES = ["ctransformers", pytest.param("llama-cpp", marks=pytest.mark.skipif(
    not llama_cpp_available(), reason="llama-cpp-python is not installed"))]


def _spec(i: int, fmt: JsonSchemaFormat | None) -> TurnSpec:
    return TurnSpec(
        session=f"s{i}",
        turn_id=f"t{i}",
        messages=(ChatMessage(role="user", content="data"),),
        params=ReplyParams(
            sampling=SamplingParams(temperature=1.0, seed=i), max_tokens=200,
            response_format=fmt,
        ),
    )


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("engine_name", ENGINES)
async def test_twenty_sampled_replies_under_a_schema_all_parse_and_validate(
    tiny_model: Path, engine_name: str
):
    """With the schema every reply validates; without it the same seeds give no JSON."""
    engine = load_engine(NodeConfig(model=tiny_model, engine=engine_name, threads=1,
                                        n_slots=1, verify_restore=False))
    fmt = JsonSchemaFormat.model_validate({"json_schema": {"schema": SCHEMA}})
    try:
        for i in range(20):
            out = await engine.run_turn(_spec(i, fmt), lambda _: None, CancelToken())
            assert out.finish_reason == "stop", out.raw_text
            jsonschema.validate(json.loads(out.raw_text), SCHEMA)
        free = [(await engine.run_turn(_spec(i, None), lambda _: None, CancelToken())).raw_text
                for i in range(5)]
        assert not any(_parses(text) for text in free)
    finally:
        await engine.close()


def test_the_sampler_never_picks_a_token_the_mask_forbids():
    """Greedy and sampled draws stay inside the mask even when forbidden logits are highest."""
    rng = np.random.default_rng(3)
    for temperature in (0.0, 0.8):
        sampler = Sampler(SamplingParams(temperature=temperature, seed=5), eos_id=0, n_vocab=500)
        for _ in range(200):
            logits = rng.normal(size=500).astype(np.float32)
            allowed = rng.random(500) < 0.05
            allowed[rng.integers(500)] = True
            logits[~allowed] += 100.0  # the forbidden tokens are by far the likeliest
            assert allowed[sampler.sample(logits, [1, 2, 3], allowed)]


def test_a_feature_the_grammar_cannot_enforce_is_refused_by_name():
    """An unimplemented keyword or format is named in the refusal; plain schemas pass."""
    assert schema_problem(SCHEMA) == ""
    assert "dependentSchemas" in schema_problem({"dependentSchemas": {"a": {}}})
    prompt = PromptRequest.model_validate({
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"d": {"type": "string", "format": "color"}}}}}],
    })
    with pytest.raises(InferError) as caught:
        check_enforceable(prompt)
    assert caught.value.status == 400 and "color" in caught.value.message
    assert "tools[0] (f)" in caught.value.message


def test_a_record_whose_keys_are_named_strings_is_enforceable():
    """zod's record schema (``propertyNames: {"type": "string"}``, as in Claude Code's
    TaskCreate tool) says nothing a JSON key does not already satisfy, so a tool with one
    is admitted; a propertyNames that does constrain the keys is still refused by name."""
    record = {"type": "object", "properties": {"metadata": {
        "type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {}}}}
    tool = {"type": "function", "function": {"name": "task", "parameters": record}}
    check_enforceable(PromptRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "tools": [tool]}))
    assert "propertyNames" in schema_problem({"type": "object",
                                              "propertyNames": {"maxLength": 3}})


def test_streamed_deltas_add_up_to_the_parsed_calls_whatever_the_chunking():
    """However the text is split, the deltas give each parsed call's id, name and arguments."""
    text = (
        'Let me look.\n<tool_call>{"name": "get_w\\u00e9ather", "arguments": {"city": '
        '"Pa\\"ris}", "n": [1, {"a": "</tool_call>"}]}}</tool_call>\n<tool_call>'
        '{"arguments": {"x": 1}, "name": "clock"}</tool_call> <tool_ca'
    )
    for seed in range(30):
        chunks, at, rnd = [], 0, random.Random(seed)
        while at < len(text):
            n = rnd.randint(1, 7)
            chunks.append(text[at : at + n])
            at += n
        counter = iter(range(100))
        stream = ToolCallStream(lambda counter=counter: f"call_{next(counter)}")
        deltas = [d for chunk in chunks for d in stream.feed(chunk)]
        _, calls = parse_tool_calls(text, stream.next_id)
        assert [c.function.name for c in calls] == ["get_w\u00e9ather", "clock"]
        for index, call in enumerate(calls):
            mine = [d for d in deltas if d.index == index]
            assert (mine[0].id, mine[0].function.name) == (call.id, call.function.name)
            streamed = "".join(d.function.arguments for d in mine)
            assert json.loads(streamed) == json.loads(call.function.arguments)


def test_schemas_are_closed_as_openai_strict_mode_reads_them_unless_they_opt_out():
    """An object declaring ``properties`` admits no other key; ``additionalProperties:
    true`` keeps one open, ``allOf`` members stay open, ``strict: false`` keeps all open."""
    from actors.engine.constraints import (
        _call_schema,
        closed_schema,
        response_grammar,
        schema_questions,
    )
    from schemas.tools import Tool

    nested = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
        "free": {"type": "object"},
        "open": {"type": "object", "properties": {}, "additionalProperties": True},
        "list": {"type": "array", "items": {"type": "object", "properties": {}}},
        "both": {"allOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}]},
        "elsewhere": {"type": "object", "properties": {}, "required": ["z"]},
    }, "$defs": {"d": {"type": "object", "properties": {"q": {}}}}}
    closed = closed_schema(nested)
    props = closed["properties"]
    assert closed["additionalProperties"] is False
    assert props["a"]["additionalProperties"] is False  # type: ignore[index]
    assert "additionalProperties" not in props["free"]  # type: ignore[operator]
    assert props["open"]["additionalProperties"] is True  # type: ignore[index]
    assert props["list"]["items"]["additionalProperties"] is False  # type: ignore[index]
    assert all("additionalProperties" not in m for m in props["both"]["allOf"])  # type: ignore[index,union-attr]
    assert closed["$defs"]["d"]["additionalProperties"] is False  # type: ignore[index]
    assert "additionalProperties" not in props["elsewhere"]  # type: ignore[operator]
    assert "additionalProperties" not in nested["properties"]["a"]  # the request's is kept

    def tool(strict: bool | None) -> Tool:
        return Tool.model_validate({"type": "function", "function": {
            "name": "f", "parameters": nested, "strict": strict}})

    arguments = _call_schema(tool(None))["properties"]["arguments"]  # type: ignore[index]
    assert arguments["additionalProperties"] is False  # type: ignore[index]
    loose = _call_schema(tool(False))["properties"]["arguments"]  # type: ignore[index]
    assert "additionalProperties" not in loose  # type: ignore[operator]
    fmt = JsonSchemaFormat.model_validate({"type": "json_schema", "json_schema": {
        "schema": {"type": "object", "properties": {"k": {}}}}})
    assert '"additionalProperties":false' in response_grammar(fmt).replace(" ", "")
    [question] = schema_questions(PromptRequest(response_format=fmt))  # admission reads alike
    assert question.schema["additionalProperties"] is False


@pytest.mark.parametrize(("raw", "content", "call"), [
    ('Sure.\n<tool_call>{"na', "Sure.", None),
    ('<tool_call>{"name": "f", "arguments": {"a": [1, 2', "", ("f", '{"a": [1, 2')),
    ('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool', "", ("f", '{"a": 1}')),
], ids=["in-the-name", "in-the-arguments", "in-the-closing-tag"])
def test_a_reply_cut_inside_a_call_keeps_its_markup_out_of_the_content(raw, content, call):
    """Cut by ``max_tokens`` inside a call block: no markup in the content; the call goes
    with what was streamed of it once its name was whole, and the finish stays length."""
    from actors.engine.templates.tool_stream import reply_calls

    stream = ToolCallStream(lambda: "call_1")
    streamed = [d for piece in (raw[:9], raw[9:]) for d in stream.feed(piece)]
    text, calls, finish = reply_calls(raw, "length", stream, CancelToken())
    assert (text, finish) == (content, "length")
    got = [(c.function.name, c.function.arguments) for c in calls]
    assert got == ([call] if call else [])
    assert "".join(d.function.arguments for d in streamed) == (call[1] if call else "")
