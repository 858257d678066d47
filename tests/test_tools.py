"""Tools on the bus: the session's tool set, forced calls streamed as deltas, typed refusals.

Everything runs a real node on the tiny random-weight model; forced calls are valid only
because the grammar makes them so.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from actors.engine.interface import CancelToken, TurnSpec
from actors.engine.loader import load_engine
from actors.engine.tokens import common_prefix
from node.client import InfernodeClient
from node.config import NodeConfig
from schemas.chat import ChatMessage, SamplingParams
from schemas.messages import PromptRequest
from schemas.records import ReplyParams
from schemas.subjects import Subjects
from schemas.tools import Tool
from tests.helpers import EventCollector, turn

S = Subjects()
SAMPLED = SamplingParams(temperature=1.0, seed=11)
WEATHER = Tool.model_validate({"function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"], "additionalProperties": False,
    },
}})
CLOCK = Tool.model_validate({"function": {
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
                   "required": ["tz"], "additionalProperties": False},
}})


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


async def record_count(url: str, session: str) -> int:
    async with InfernodeClient(url) as client:
        try:
            return len((await client.history(session)).records)
        except Exception:  # no records yet
            return 0


async def test_a_forced_call_streams_its_name_then_its_arguments_and_arrives_whole_in_done(
    make_node, nc
):
    """A named tool choice yields a valid call: deltas (id and name first) add up to done's."""
    await make_node()
    prompt = PromptRequest(
        messages=(user("weather in Paris?"),), tools=(WEATHER, CLOCK),
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        sampling=SAMPLED, max_tokens=80,
    )
    events = await turn(nc, "tc", prompt)
    done = events["done"][0]
    assert done["finish_reason"] == "tool_calls"
    [call] = done["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, WEATHER.function.parameters)
    deltas = [d for e in events["tool_call"] for d in e["tool_calls"]]
    assert deltas[0]["id"] == call["id"] and deltas[0]["function"]["name"] == "get_weather"
    assert all(d["id"] is None and d["function"]["name"] is None for d in deltas[1:])
    assert json.loads("".join(d["function"]["arguments"] for d in deltas)) == arguments
    usage = done["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": usage["cached_tokens"]}


async def test_required_tool_choice_calls_one_of_the_declared_tools(make_node, nc):
    """``tool_choice: required`` forces one call to some declared tool, valid for its schema."""
    await make_node()
    prompt = PromptRequest(messages=(user("help"),), tools=(WEATHER, CLOCK),
                           tool_choice="required", sampling=SAMPLED, max_tokens=80)
    [call] = (await turn(nc, "req", prompt))["done"][0]["tool_calls"]
    tool = {t.function.name: t for t in (WEATHER, CLOCK)}[call["function"]["name"]]
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool.function.parameters)


async def test_a_json_object_response_format_gives_a_json_object(make_node, nc):
    """``response_format: json_object`` makes the random model's reply a JSON object."""
    await make_node()
    prompt = PromptRequest(messages=(user("json please"),), sampling=SAMPLED, max_tokens=200,
                           response_format={"type": "json_object"})
    done = (await turn(nc, "fmt", prompt))["done"][0]
    assert done["finish_reason"] == "stop"
    assert isinstance(json.loads(done["text"]), dict)


async def test_the_tool_set_is_kept_in_the_record_log_and_a_rebuild_restores_it(make_node, nc):
    """Tools sent once serve a forced call after a restart, from the rebuilt session."""
    node = await make_node()
    first = PromptRequest(messages=(user("remember these tools"),), tools=(WEATHER,),
                          reply=False)
    events = await EventCollector.start(nc, S.events("keep", "accepted"))
    await nc.jetstream().publish(S.prompt("keep"), first.model_dump_json().encode())
    await events.wait_until(lambda ms: len(ms) >= 1, timeout=30)
    await node.stop()
    restarted = await make_node()  # same server: it rebuilds the session from its log
    async with InfernodeClient(restarted.url) as client:
        history = await client.history("keep")
    assert [r.kind for r in history.records][:2] == ["tools", "user"]
    forced = PromptRequest(messages=(user("now call it"),), tool_choice="required",
                           sampling=SAMPLED, max_tokens=80)
    done = (await turn(nc, "keep", forced))["done"][0]
    assert [c["function"]["name"] for c in done["tool_calls"]] == ["get_weather"]


async def test_a_prompt_with_tools_replaces_the_session_tool_set(make_node, nc):
    """After ``tools: [get_time]``, a choice naming get_weather is refused: the set was replaced."""
    node = await make_node()
    for tools in ((WEATHER, CLOCK), (CLOCK,)):
        prompt = PromptRequest(messages=(user("tools"),), tools=tools, sampling=SAMPLED,
                               max_tokens=2)
        assert "commit" in await turn(nc, "swap", prompt)
    before = await record_count(node.url, "swap")
    named = PromptRequest(messages=(user("weather"),), max_tokens=2,
                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    error = (await turn(nc, "swap", named))["error"][0]
    assert error["code"] == "bad_request" and "get_weather" in error["message"]
    assert "get_time" in error["message"]
    assert await record_count(node.url, "swap") == before


BAD_INPUTS = [
    pytest.param(
        {"tools": [{"type": "function", "function": {"name": "f",
                    "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}]},
        "not a valid JSON Schema", id="invalid-tool-schema"),
    pytest.param(
        {"tools": [WEATHER.model_dump()],
         "tool_choice": {"type": "function", "function": {"name": "launch"}}},
        "'launch'", id="choice-names-an-undeclared-tool"),
    pytest.param(
        {"messages": [{"role": "tool", "tool_call_id": "call_nobody", "content": "42"}]},
        "call_nobody", id="tool-result-for-an-unknown-call"),
    pytest.param(
        {"tools": [WEATHER.model_dump()], "tool_choice": "required",
         "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
        "cannot be combined", id="json-schema-with-a-forced-call"),
    pytest.param(
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {
            "type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}}}},
        "dependentSchemas", id="schema-feature-the-grammar-cannot-enforce"),
    pytest.param(
        {"tool_choice": "required"}, "has no tools", id="forced-call-without-tools"),
]


@pytest.mark.parametrize(("fields", "needle"), BAD_INPUTS)
async def test_bad_tool_input_gets_one_typed_error_records_nothing_and_the_session_serves(
    make_node, nc, fields, needle
):
    """Each bad tool input is one bad_request naming the problem; nothing is recorded."""
    node = await make_node()
    ok = PromptRequest(messages=(user("hello"),), max_tokens=2, sampling=SAMPLED)
    assert "commit" in await turn(nc, "bad", ok)
    before = await record_count(node.url, "bad")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    errors = await EventCollector.start(nc, S.events("bad", "error"))
    await nc.jetstream().publish(S.prompt("bad"), json.dumps(body).encode())
    await errors.wait_until(lambda ms: len(ms) >= 1, timeout=30)
    [event] = [json.loads(m.data) for m in errors.messages]
    assert event["code"] == "bad_request" and event["status"] == 400
    assert needle in event["message"]
    assert await record_count(node.url, "bad") == before
    again = await turn(nc, "bad", ok)
    assert again["commit"][0]["generation"] == 2
    assert len(errors.messages) == 1


async def test_a_change_of_tools_costs_only_the_tokens_after_the_first_difference(tiny_model):
    """Turn 2 with one more tool re-evaluates only from where its prompt first differs."""
    engine = load_engine(NodeConfig(model=tiny_model, threads=1, n_slots=1,
                                        verify_restore=False))
    try:
        greedy = SamplingParams(temperature=0.0)
        first = TurnSpec(
            session="s",
            turn_id="t1",
            messages=(user("weather?"),),
            tools=(WEATHER,),
            params=ReplyParams(sampling=greedy, max_tokens=4),
        )
        out = await engine.run_turn(first, lambda _: None, CancelToken())
        had = list(engine.pool.slots[0].tokens)
        reply = ChatMessage(role="assistant", content=out.raw_text)
        second = TurnSpec(
            session="s",
            turn_id="t2",
            messages=(user("weather?"), reply, user("and time?")),
            tools=(WEATHER, CLOCK),
            assistant_tokens={1: out.completion_ids or ()},
            params=ReplyParams(sampling=greedy, max_tokens=4),
        )
        tokens = engine.prompt_tokens(second)
        shared = common_prefix(had, tokens)
        after = await engine.run_turn(second, lambda _: None, CancelToken())
        unchanged = engine.prompt_tokens(TurnSpec(
            session="x",
            turn_id="x",
            messages=(user("weather?"),),
            tools=(WEATHER,),
            params=ReplyParams(sampling=greedy),
        ))
        # The tools block lists WEATHER first: everything up to CLOCK's entry is reused.
        assert shared > len(unchanged) // 2
        assert after.usage.cached_tokens == shared
        assert after.usage.new_prefill_tokens == len(tokens) - shared
    finally:
        await engine.close()


async def test_the_readme_tools_example_gets_a_valid_forced_call(make_node, nc):
    """The README's tools prompt, sent verbatim, is answered by a call valid for its schema."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Tools and JSON output", 1)[1]
    body = section.split("```json\n", 1)[1].split("```", 1)[0]
    example = json.loads(body)
    await make_node()
    events = await EventCollector.start(nc, S.events("readme", "done"))
    await nc.jetstream().publish(S.prompt("readme"), body.encode())
    await events.wait_until(lambda ms: len(ms) >= 1, timeout=60)
    [call] = json.loads(events.messages[0].data)["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    schema = example["tools"][0]["function"]["parameters"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema)


@pytest.mark.parametrize("name", ["chatml", "llama-2", "mistral"])
def test_built_in_templates_write_the_same_tools_block_as_templates_without_tools(name: str):
    """Every built-in template lists tools exactly as a GGUF template without tools gets them."""
    from actors.engine.templates.chat import FALLBACK_SOURCES, ChatTemplate
    from actors.engine.templates.tool_text import tools_block

    tools = [WEATHER.model_dump(exclude_none=True), CLOCK.model_dump(exclude_none=True)]
    built_in = ChatTemplate(FALLBACK_SOURCES[name], "<s>", "</s>", name=name)
    assert built_in.reads_tools
    rendered = built_in.render([ChatMessage(role="system", content="Be brief."), user("hi")],
                               tools=tools)
    assert tools_block(tools) in rendered
