"""The OpenAI Responses API door (``POST /v1/responses``) with the official `openai` SDK, on
the real engine and the random-weight tiny model: text and item input, the typed stream,
``previous_response_id`` continuing on the reused prefix, forced function calls and their
outputs, Codex's tool list, JSON output, and unknown fields refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
           "required": ["city"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Weather of a city.",
                "parameters": WEATHER, "strict": True}
GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 6}


async def _client(make_node) -> openai.AsyncOpenAI:
    node = await make_node(openai_port=0)
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{node.gateway.port}/v1",
                              api_key="unused", max_retries=0)


async def test_text_input_is_answered_as_a_typed_response_with_usage(make_node):
    """A string input gives a completed ``response`` the SDK parses, with ``output_text``."""
    client = await _client(make_node)
    r = await client.responses.create(model="any", input="Hello there", temperature=0,
                                      max_output_tokens=64)
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status in ("completed", "incomplete")
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert r.output_text == item.content[0].text and r.output_text
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


async def test_an_answer_cut_at_max_output_tokens_is_incomplete(make_node):
    """``max_output_tokens`` reached: status ``incomplete`` with its reason."""
    client = await _client(make_node)
    r = await client.responses.create(model="any", input="Hello", **GREEDY)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 6


async def test_items_with_instructions_are_one_conversation_the_stream_answers_in_order(
    make_node,
):
    """Instructions and message items stream as the documented events, in order, numbered,
    ending in a response with usage that matches the deltas."""
    client = await _client(make_node)
    items = [{"role": "user", "content": "Hi"},
             {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": "Hello!"}]},
             {"type": "message", "role": "developer",
              "content": [{"type": "input_text", "text": "Be brief."}]},
             {"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": "How are you?"}]}]
    stream = await client.responses.create(model="any", input=items, instructions="Be kind.",
                                           stream=True, **GREEDY)
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added",
                         "response.output_text.delta"]
    assert kinds[-5:] == ["response.output_text.delta", "response.output_text.done",
                          "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text and final.instructions == "Be kind."
    assert final.usage.output_tokens == 6 and final.usage.input_tokens > 10


async def test_previous_response_id_continues_the_conversation_on_its_reused_prefix(
    make_node,
):
    """The second turn sends only its new item; everything before it is reused from the KV
    state of the first turn's session (streamed through the SDK's stream helper)."""
    client = await _client(make_node)
    first = await client.responses.create(model="any", input="Tell me a story",
                                          instructions="You tell stories.", **GREEDY)
    async with client.responses.stream(
        model="any", input=[{"role": "user", "content": "And then?"}],
        previous_response_id=first.id, instructions="You tell stories.", **GREEDY,
    ) as s:
        events = [e async for e in s]
    # Cut at max_output_tokens, it ends in response.incomplete (the helper's final
    # response is only a completed one).
    assert events[-1].type == "response.incomplete"
    second = events[-1].response
    assert second.previous_response_id == first.id
    reusable = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens == reusable
    assert second.usage.input_tokens > reusable


async def test_a_previous_response_id_unknown_or_of_another_agent_is_a_404_naming_it(
    make_node, tmp_path: Path,
):
    """A response id no one stored, or one another API key's agent stored, is refused 404
    with ``param`` previous_response_id; its own agent continues it."""
    keys = tmp_path / "keys"
    keys.write_text("alice-key-0123456789 alice\nbob-key-0123456789ab bob\n")
    node = await make_node(openai_port=0, api_keys=keys)
    base = f"http://127.0.0.1:{node.gateway.port}/v1"
    alice, bob = (openai.AsyncOpenAI(base_url=base, api_key=k, max_retries=0)
                  for k in ("alice-key-0123456789", "bob-key-0123456789ab"))
    first = await alice.responses.create(model="any", input="hi", **GREEDY)
    for client, rid in [(alice, "resp_" + "0" * 32), (bob, first.id)]:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.responses.create(model="any", input="more",
                                          previous_response_id=rid, **GREEDY)
        assert caught.value.param == "previous_response_id" and rid in caught.value.message
    again = await alice.responses.create(model="any", input="more",
                                         previous_response_id=first.id, **GREEDY)
    assert again.usage.input_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_forced_function_call_is_an_output_item_its_output_continues_it(
    make_node, stream,
):
    """``tool_choice`` naming a function gives a ``function_call`` item valid for its
    schema (streamed as argument deltas); its ``function_call_output`` is answered on the
    reused prefix, resent whole or sent alone after ``previous_response_id``."""
    client = await _client(make_node)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = dict(model="any", input=ask, tools=[WEATHER_TOOL], temperature=1.0,
                  tool_choice={"type": "function", "name": "get_weather"},
                  max_output_tokens=80)
    if stream:
        events = [e async for e in await client.responses.create(stream=True, **forced)]
        first = events[-1].response
        deltas = "".join(e.delta for e in events
                         if e.type == "response.function_call_arguments.delta")
        [args_done] = [e for e in events
                       if e.type == "response.function_call_arguments.done"]
        assert deltas == args_done.arguments == first.output[0].arguments
    else:
        first = await client.responses.create(**forced)
    assert first.status == "completed"
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id and call.id.startswith("fc_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    result = {"type": "function_call_output", "call_id": call.call_id,
              "output": "18 C and sunny"}
    after = dict(model="any", tools=[WEATHER_TOOL], tool_choice="none", temperature=0,
                 max_output_tokens=8)
    if stream:  # stateless: the whole conversation again, the call echoed as the SDK has it
        answer = await client.responses.create(
            input=[*ask, call.model_dump(exclude_none=True), result], **after)
    else:
        answer = await client.responses.create(input=[result], previous_response_id=first.id,
                                               **after)
    assert answer.output_text
    reusable = first.usage.input_tokens + first.usage.output_tokens
    assert answer.usage.input_tokens_details.cached_tokens == reusable


async def test_a_prompt_the_context_cannot_hold_is_a_422_streamed_or_not(make_node):
    """A prompt the context cannot hold is refused before a stream opens: the SDK raises
    UnprocessableEntityError carrying the node's sentence, streamed as unstreamed."""
    client = await _client(make_node)
    too_long = "hello " * 3000
    with pytest.raises(openai.UnprocessableEntityError) as streamed:
        await client.responses.create(model="any", input=too_long, stream=True, **GREEDY)
    assert "context holds" in str(streamed.value)
    with pytest.raises(openai.UnprocessableEntityError):
        await client.responses.create(model="any", input=too_long, **GREEDY)


CODEX_TOOLS = [
    {"type": "function", "name": "shell", "description": "Runs a command.", "strict": False,
     "parameters": {"type": "object", "properties": {
         "command": {"type": "array", "items": {"type": "string"}}}, "required": ["command"]}},
    {"type": "local_shell"},
    {"type": "web_search", "search_context_size": "medium"},
    {"type": "custom", "name": "apply_patch", "description": "Edits files.",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
]


async def test_a_codex_style_request_with_hosted_tools_is_answered(make_node):
    """Codex's request shape (hosted tool types, reasoning, include, store false,
    prompt_cache_key, a session_id header) is accepted, also when retried whole; only
    function tools are offered."""
    client = await _client(make_node)
    codex = dict(
        model="gpt-5-codex", instructions="You are a coding agent.",
        input=[{"type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "list files"}]}],
        tools=CODEX_TOOLS, tool_choice="auto", parallel_tool_calls=False,
        reasoning={"effort": "medium", "summary": "auto"}, store=False,
        include=["reasoning.encrypted_content"], prompt_cache_key="conv-1234",
        extra_headers={"session_id": "7f1c-codex-session"},
        extra_body={"client_metadata": {"originator": "codex_cli_rs"}}, **GREEDY)
    r = await client.responses.create(**codex)
    again = await client.responses.create(**codex)  # a retry after a dropped stream forks
    assert again.status == "incomplete" and again.id != r.id
    assert r.status == "incomplete" and r.output
    assert [t.name for t in r.tools] == ["shell"]
    try:
        await client.responses.create(model="any", input="hi", previous_response_id=r.id,
                                      **GREEDY)
    except openai.NotFoundError as e:
        assert e.param == "previous_response_id"  # store false: nothing kept
    else:
        raise AssertionError("a response made with store false was continued")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_text_format_json_schema_answers_json_that_validates(make_node, stream):
    """``text.format`` json_schema makes the random model's answer JSON valid for it; the
    SDK's stream helper adds the stream up to the completed response."""
    client = await _client(make_node)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    fields: dict[str, Any] = dict(
        model="any", input="Weather?", temperature=1.0, max_output_tokens=120,
        text={"format": {"type": "json_schema", "name": "weather", "schema": schema,
                         "strict": True}})
    if stream:
        async with client.responses.stream(**fields) as s:
            r = await s.get_final_response()
    else:
        r = await client.responses.create(**fields)
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


BAD_SCHEMA_TOOL = {"type": "function", "name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "nope"}}}}


async def test_an_unknown_field_or_bad_tool_is_a_400_naming_it_and_the_door_serves_on(
    make_node,
):
    """An undocumented field, or a tool schema that is no JSON Schema, is refused in
    OpenAI's error shape with ``param`` spelled as the Responses API spells it."""
    node = await make_node(openai_port=0)
    base = f"http://127.0.0.1:{node.gateway.port}/v1"
    body = {"model": "any", "input": "hi", "max_output_tokens": 2}
    async with httpx.AsyncClient(timeout=60) as http:
        for extra, param in [({"temprature": 0.5}, "temprature"),
                             ({"tools": [{"type": "web_search"}, BAD_SCHEMA_TOOL]},
                              "tools.1.parameters")]:
            r = await http.post(f"{base}/responses", json={**body, **extra})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error"
            assert param in error["message"], error
        ok = await http.post(f"{base}/responses", json=body)
        assert ok.status_code == 200 and ok.json()["object"] == "response"
