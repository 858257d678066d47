"""Tools and JSON output through the OpenAI gateway, with the official `openai` SDK: a forced
tool call on the random-weight tiny model, its result sent back, the next turn answered on
the reused prefix; JSON-schema answers; bad tool input as OpenAI error objects."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

WEATHER_PARAMS = {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"], "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}},
]
FORCE = {"type": "function", "function": {"name": "get_weather"}}
SAMPLED = {"temperature": 1.0, "seed": 7, "max_tokens": 80}
USAGE = {"stream_options": {"include_usage": True}}


async def _gateway(make_node) -> str:
    node = await make_node(openai_port=0)
    return f"http://127.0.0.1:{node.gateway.port}/v1"


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _turn(base: str, sync: bool, stream: bool, **kwargs: Any) -> Any:
    """One chat completion; a streamed call is added up by the SDK's own stream helper."""
    if sync:
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        if not stream:
            return asyncio.to_thread(client.chat.completions.create, **kwargs)

        def streamed() -> tuple[Any, list[Any]]:
            with client.chat.completions.stream(**kwargs, **USAGE) as s:
                chunks = [e.chunk for e in s if e.type == "chunk"]
                return s.get_final_completion(), chunks

        return asyncio.to_thread(streamed)
    aclient = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
    if not stream:
        return aclient.chat.completions.create(**kwargs)

    async def astreamed() -> tuple[Any, list[Any]]:
        async with aclient.chat.completions.stream(**kwargs, **USAGE) as s:
            chunks = [e.chunk async for e in s if e.type == "chunk"]
            return await s.get_final_completion(), chunks

    return astreamed()


async def _text_turn(base: str, sync: bool, stream: bool, **kwargs: Any) -> tuple[str, str, Any]:
    """A text answer's content, finish reason and usage (a stream read chunk by chunk: the
    SDK's helper refuses an answer cut at ``max_tokens``)."""
    if not stream:
        answer = await _turn(base, sync, False, **kwargs)
        choice = answer.choices[0]
        assert not choice.message.tool_calls
        return choice.message.content, choice.finish_reason, answer.usage
    if sync:
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        chunks = await asyncio.to_thread(
            lambda: list(client.chat.completions.create(stream=True, **kwargs, **USAGE)))
    else:
        aclient = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
        chunks = [c async for c in await aclient.chat.completions.create(
            stream=True, **kwargs, **USAGE)]
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return text, finish, chunks[-1].usage


def _check_streamed_call(chunks: list[Any]) -> None:
    """Tool-call deltas come as OpenAI streams them: id, type and name first, then arguments."""
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert deltas and deltas[0].index == 0 and deltas[0].id and deltas[0].type == "function"
    assert deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert len(deltas) > 2  # the arguments arrived in pieces, as they were generated
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "tool_calls" and finishes.count("tool_calls") == 1
    contents = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "<tool_call>" not in contents


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_forced_tool_call_loop_reuses_the_prefix_for_the_answer(make_node, sync, stream):
    """A forced call is valid for its schema; its result goes back and the answer reuses all."""
    base = await _gateway(make_node)
    messages: list[Any] = [_user("What is the weather in Paris?")]
    got = await _turn(base, sync, stream, model="any", messages=messages, tools=TOOLS,
                      tool_choice=FORCE, **SAMPLED)
    first, chunks = got if stream else (got, [])
    if stream:
        _check_streamed_call(chunks)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    text, finish, usage = await _text_turn(
        base, sync, stream, model="any", messages=messages, tools=TOOLS, tool_choice="none",
        temperature=0, max_tokens=8)
    assert text and finish in ("stop", "length")
    reusable = first.usage.prompt_tokens + first.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == reusable
    assert usage.prompt_tokens > reusable


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_json_schema_response_format_answers_json_that_validates(make_node, stream):
    """``response_format: json_schema`` gives the random model's answer as valid JSON."""
    base = await _gateway(make_node)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema,
                                                  "strict": True}}
    got = await _turn(base, False, stream, model="any", messages=[_user("Weather?")],
                      response_format=fmt, temperature=1.0, seed=3, max_tokens=120)
    answer = got[0] if stream else got
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


async def test_json_object_response_format_answers_a_json_object(make_node):
    """``response_format: json_object`` gives a JSON object."""
    base = await _gateway(make_node)
    answer = await _turn(base, False, False, model="any", messages=[_user("json please")],
                         response_format={"type": "json_object"}, temperature=1.0, seed=11,
                         max_tokens=200)
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


async def test_required_tool_choice_calls_one_of_the_request_tools(make_node):
    """``tool_choice: required`` forces one call to one of the request's tools."""
    base = await _gateway(make_node)
    answer = await _turn(base, False, False, model="any", messages=[_user("help")],
                         tools=TOOLS, tool_choice="required", **SAMPLED)
    [call] = answer.choices[0].message.tool_calls
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])


UNENFORCEABLE = {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}
BAD_TOOL_INPUT = [
    pytest.param({"tools": TOOLS, "tool_choice": {"type": "function",
                                                  "function": {"name": "launch"}}},
                 "tool_choice", "launch", id="choice-names-no-tool"),
    pytest.param({"tool_choice": "sometimes"}, "tool_choice", "auto", id="unknown-choice"),
    pytest.param({"tool_choice": "required"}, "tool_choice", "no tools",
                 id="forced-without-tools"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}]},
        "tools.0.function.parameters", "JSON Schema", id="malformed-tool-schema"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f",
                                                              "parameters": UNENFORCEABLE}}],
                  "tool_choice": "required"},
                 "tools.0.function.parameters", "dependentSchemas", id="unenforceable-schema"),
    pytest.param({"response_format": {"type": "json_schema",
                                      "json_schema": {"schema": {"type": "nope"}}}},
                 "response_format.json_schema.schema", "JSON Schema", id="malformed-format"),
    pytest.param({"tools": TOOLS, "tool_choice": "required",
                  "response_format": {"type": "json_object"}},
                 "response_format", "cannot be combined", id="format-with-forced-call"),
    pytest.param({"messages": [_user("hi"), {"role": "assistant", "content": "ok"},
                               {"role": "tool", "tool_call_id": "call_nobody",
                                "content": "42"}]},
                 "messages.2.tool_call_id", "call_nobody", id="result-of-no-call"),
]


@pytest.mark.parametrize(("fields", "param", "needle"), BAD_TOOL_INPUT)
async def test_bad_tool_input_is_a_400_naming_the_param_and_the_gateway_serves_on(
    make_node, fields, param, needle
):
    """Each bad tool input is an OpenAI error object, 400, with a sentence and its param."""
    base = await _gateway(make_node)
    body = {"model": "any", "messages": [_user("hi")], "max_tokens": 2, **fields}
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{base}/chat/completions", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "bad_request"
        assert error["param"] == param and needle in error["message"], error
        ok = await http.post(f"{base}/chat/completions", json={
            "model": "any", "messages": [_user("hi")], "max_tokens": 2})
        assert ok.status_code == 200, ok.text


async def test_sdk_raises_bad_request_with_the_param_for_a_result_of_no_call(make_node):
    """The SDK sees a tool result answering an unknown call as BadRequestError with param."""
    base = await _gateway(make_node)
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="any", max_tokens=2, messages=[
            _user("hi"), {"role": "tool", "tool_call_id": "call_x", "content": "1"}])
    assert caught.value.param == "messages.1.tool_call_id"


def test_every_tool_format_and_sampling_field_of_a_request_reaches_the_prompt():
    """The request's tools, choice, format and sampling fields map 1:1 onto the prompt."""
    from actors.gateway.wire import parse_request, prompt_for

    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER_PARAMS}}
    body = {"model": "m", "messages": [_user("hi")], "tools": TOOLS, "tool_choice": FORCE,
            "temperature": 0.3, "top_p": 0.5, "top_k": 7, "seed": 9, "repeat_penalty": 1.3,
            "repeat_last_n": 16, "frequency_penalty": 0.25, "presence_penalty": -0.5,
            "stop": ["END"], "max_completion_tokens": 33, "parallel_tool_calls": False}
    req = parse_request(json.dumps(body).encode())
    prompt = prompt_for(req, req.chat_messages(), "key", None)
    assert [t.model_dump(exclude_none=True) for t in prompt.tools or ()] == TOOLS
    assert prompt.tool_choice is not None and prompt.tool_choice.model_dump() == FORCE
    assert prompt.parallel_tool_calls is False and prompt.stop == ("END",)
    assert prompt.max_tokens == 33
    assert prompt.sampling.model_dump() == {
        "temperature": 0.3, "top_p": 0.5, "top_k": 7, "seed": 9, "repeat_penalty": 1.3,
        "repeat_last_n": 16, "frequency_penalty": 0.25, "presence_penalty": -0.5}
    formatted = parse_request(json.dumps({**body, "tool_choice": "auto",
                                          "response_format": fmt}).encode())
    prompt = prompt_for(formatted, formatted.chat_messages(), "key", None)
    assert prompt.response_format is not None
    assert prompt.response_format.model_dump(by_alias=True, exclude_none=True) == {
        "type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER_PARAMS}}
    bare = parse_request(json.dumps({"messages": [_user("hi")]}).encode())
    assert prompt_for(bare, bare.chat_messages(), "key", None).tools == ()  # none this turn


def test_calls_the_stream_missed_or_cut_short_are_completed_from_done():
    """At done the relay sends a call the stream never showed whole, and a cut tail."""
    from actors.gateway.stream import ToolCallRelay
    from schemas.messages import DoneEvent, ToolCallEvent

    relay = ToolCallRelay()
    streamed = ToolCallEvent(session="s", turn_id="t", tool_calls=(
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather"}},
        {"index": 0, "function": {"arguments": '{"city": "Pa'}},
    ))
    assert relay.deltas(streamed) == [
        {"index": 0, "id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": "Pa'}},
    ]
    done = DoneEvent.model_validate({
        "session": "s", "turn_id": "t", "parent_ids": [], "text": "",
        "finish_reason": "tool_calls", "tool_calls": [
            {"id": "call_a", "function": {"name": "get_weather",
                                          "arguments": '{"city": "Paris"}'}},
            {"id": "call_b", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}],
        "usage": {"prompt_tokens": 1, "cached_tokens": 0, "new_prefill_tokens": 1,
                  "completion_tokens": 1},
        "cache": {"source": "none"}, "timings": {},
    })
    assert relay.rest(done) == [
        {"index": 0, "function": {"arguments": 'ris"}'}},
        {"index": 1, "id": "call_b", "type": "function",
         "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}},
    ]


def test_a_call_echoed_with_other_json_spacing_continues_the_same_conversation():
    """The conversation hash reads a call's arguments as JSON, not as their spelling."""
    from actors.gateway.chain import chain
    from schemas.chat import ChatMessage

    def said(arguments: str) -> ChatMessage:
        return ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "function": {"name": "get_weather", "arguments": arguments}}]})

    spaced = chain("", [ChatMessage(role="user", content="hi"), said('{"city": "Paris"}')])
    tight = chain("", [ChatMessage(role="user", content="hi"), said('{"city":"Paris"}')])
    other = chain("", [ChatMessage(role="user", content="hi"), said('{"city":"Rome"}')])
    assert spaced == tight and spaced[-1] != other[-1]


OPEN_PARAMS = {"type": "object", "properties": {
    "tz": {"enum": ["UTC", "CET"]}, "city": {"type": "string", "maxLength": 8}},
    "required": ["tz"]}
"""A schema that says nothing of other keys, as most agents' tool schemas do."""


@pytest.mark.parametrize("seed", [2, 3])
async def test_a_forced_call_to_a_schema_without_additional_properties_has_only_its_keys(
    make_node, seed
):
    """A forced call follows OpenAI strict semantics: no key the schema does not declare,
    so the random model's call is whole and parsed within ``max_tokens``."""
    base = await _gateway(make_node)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": OPEN_PARAMS}}]
    answer = await _turn(base, False, False, model="any", messages=[_user("time?")],
                         tools=tools, tool_choice="required", temperature=1.0, seed=seed,
                         max_tokens=150)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert set(arguments) <= {"tz", "city"}, arguments
    jsonschema.validate(arguments, OPEN_PARAMS)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_forced_call_cut_by_max_tokens_is_a_truncated_call_not_content(make_node, stream):
    """Cut inside its arguments, a forced call comes back as OpenAI answers it: the call with
    the arguments generated so far, ``finish_reason: length``, no markup in the content."""
    base = await _gateway(make_node)
    kwargs = {"model": "any", "messages": [_user("Weather in Paris?")], "tools": TOOLS,
              "tool_choice": FORCE, "temperature": 1.0, "seed": 7, "max_tokens": 50}
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
    if stream:
        chunks = [c async for c in await client.chat.completions.create(stream=True, **kwargs)]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
        assert {d.index for d in deltas} == {0}
        name, arguments = deltas[0].function.name, "".join(
            d.function.arguments or "" for d in deltas)
    else:
        answer = await client.chat.completions.create(**kwargs)
        choice = answer.choices[0]
        content, finish = choice.message.content or "", choice.finish_reason
        assert "<tool_call>" not in content, content
        [call] = choice.message.tool_calls or ()
        name, arguments = call.function.name, call.function.arguments
    assert finish == "length"
    assert "<tool_call>" not in content and "{" not in content, content
    assert name == "get_weather" and arguments.startswith('{"city": "'), arguments
    with pytest.raises(ValueError):
        json.loads(arguments)  # cut short, as OpenAI's would be
