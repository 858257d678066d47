"""Anthropic's Messages API at the gateway, with the official `anthropic` SDK: messages with
system blocks, streamed events, the prefix reused on a conversation's second turn, forced
tool calls and their results, counted tokens, API keys, and Anthropic error objects."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from node.client import InfernodeClient
from tests.helpers import until

WEATHER = {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"], "additionalProperties": False,
}
TOOLS = [{"name": "get_weather", "description": "Weather of a city.", "input_schema": WEATHER},
         {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}]
FORCE = {"type": "tool", "name": "get_weather"}
GREEDY = {"model": "claude-test", "max_tokens": 6, "extra_body": {"temperature": 0}}
RAW = {"model": "claude-test", "max_tokens": 6, "temperature": 0}
SYSTEM = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
          {"type": "text", "text": "Answer in English."}]


async def _gateway(make_node, **settings: Any) -> tuple[Any, str]:
    node = await make_node(openai_port=0, **settings)
    return node, f"http://127.0.0.1:{node.gateway.port}"


def _client(base: str, key: str = "unused") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=base, api_key=key, max_retries=0)


def _user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def _prompt_total(usage: Any) -> int:
    return (usage.input_tokens + usage.cache_read_input_tokens
            + usage.cache_creation_input_tokens)


async def test_plain_message_is_an_anthropic_message_with_usage(make_node):
    """A string message gets a message with a text block, the model echoed, and usage."""
    _, base = await _gateway(make_node)
    answer = await _client(base).messages.create(messages=[_user("hi")], **GREEDY)
    assert answer.type == "message" and answer.role == "assistant"
    assert answer.model == "claude-test" and answer.id.startswith("msg_")
    [block] = answer.content
    assert block.type == "text" and block.text
    assert answer.stop_reason == "max_tokens" and answer.stop_sequence is None
    assert answer.usage.output_tokens == 6 and answer.usage.input_tokens > 0
    assert answer.usage.cache_read_input_tokens == 0
    assert answer.usage.cache_creation_input_tokens == 0


async def test_count_tokens_equals_the_input_a_system_block_message_is_charged(make_node):
    """count_tokens of a request with system blocks and tools is its prompt's usage."""
    _, base = await _gateway(make_node)
    client = _client(base)
    request = {"system": SYSTEM, "messages": [_user([{"type": "text", "text": "hi"}])],
               "tools": TOOLS}
    counted = await client.messages.count_tokens(model="claude-test", **request)
    answer = await client.messages.create(**request, **GREEDY)
    assert answer.content[0].type == "text"
    assert counted.input_tokens == _prompt_total(answer.usage) > 0
    bare = await client.messages.count_tokens(model="claude-test", messages=[_user("hi")])
    assert 0 < bare.input_tokens < counted.input_tokens  # the system prompt and tool count


async def test_stream_sends_events_in_order_and_the_second_turn_reads_the_cache(make_node):
    """message_start, one text block's start/deltas/stop, message_delta, message_stop; the
    next turn of the conversation reuses the first turn's prefix."""
    _, base = await _gateway(make_node)
    client = _client(base)
    messages: list[Any] = [_user("Tell me a story.")]
    finals = []
    for turn in range(2):
        async with client.messages.stream(system=SYSTEM, messages=messages, **GREEDY) as s:
            kinds = [e.type async for e in s if e.type not in ("text", "ping")]
            final = await s.get_final_message()
        deltas = kinds[2:-3]
        assert kinds[:2] == ["message_start", "content_block_start"], kinds
        assert deltas and set(deltas) == {"content_block_delta"}, kinds
        assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"], kinds
        assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 6
        finals.append(final)
        messages += [{"role": "assistant", "content": [b.model_dump() for b in final.content]},
                     _user(f"And then? ({turn})")]
    first, second = finals
    assert first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_read_input_tokens >= _prompt_total(first.usage)
    assert second.usage.input_tokens > 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_stop_sequence_ends_the_answer_and_is_named(make_node, stream):
    """An answer cut by one of stop_sequences says stop_sequence and which one."""
    _, base = await _gateway(make_node)
    client = _client(base)
    free = await client.messages.create(messages=[_user("hi")], **GREEDY)
    text = free.content[0].text
    stop = next(c for c in text[1:] if not c.isspace())  # greedy: the same text comes again
    request = {"messages": [_user("hi")], "stop_sequences": ["\x00never", stop], **GREEDY}
    if stream:
        async with client.messages.stream(**request) as s:
            answer = await s.get_final_message()
    else:
        answer = await client.messages.create(**request)
    assert answer.stop_reason == "stop_sequence" and answer.stop_sequence == stop
    assert answer.content[0].text == text[: text.index(stop, 1)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_forced_tool_call_is_a_tool_use_block_with_parsed_input(make_node, stream):
    """tool_choice {type: tool} gives one tool_use block whose input fits the schema."""
    _, base = await _gateway(make_node)
    client = _client(base)
    request = {"model": "claude-test", "max_tokens": 80, "extra_body": {"temperature": 1.0},
               "messages": [_user("Weather in Paris?")], "tools": TOOLS, "tool_choice": FORCE}
    if stream:
        async with client.messages.stream(**request) as s:
            events = [e async for e in s]
            answer = await s.get_final_message()
        [start] = [e for e in events if e.type == "content_block_start"
                   and e.content_block.type == "tool_use"]
        assert start.content_block.name == "get_weather" and start.content_block.input == {}
        assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta"
                   for e in events)
    else:
        answer = await client.messages.create(**request)
    assert answer.stop_reason == "tool_use"
    [call] = [b for b in answer.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id
    jsonschema.validate(call.input, WEATHER)


async def test_tool_result_turn_is_answered_on_the_reused_prefix(make_node):
    """The tool_result of a forced call goes back; the answer is text on the cached prefix."""
    _, base = await _gateway(make_node)
    client = _client(base)
    messages: list[Any] = [_user("Weather in Paris?")]
    first = await client.messages.create(
        model="claude-test", max_tokens=80, extra_body={"temperature": 1.0}, messages=messages,
        tools=TOOLS,
        tool_choice=FORCE)
    [call] = [b for b in first.content if b.type == "tool_use"]
    messages += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                 _user([{"type": "tool_result", "tool_use_id": call.id,
                         "content": [{"type": "text", "text": "18 C and sunny"}]}])]
    answer = await client.messages.create(messages=messages, tools=TOOLS,
                                          tool_choice={"type": "none"}, **GREEDY)
    assert [b.type for b in answer.content] == ["text"]
    assert answer.stop_reason == "max_tokens"
    assert answer.usage.cache_read_input_tokens >= _prompt_total(first.usage)


async def test_unknown_field_is_an_anthropic_400_naming_it_and_records_nothing(make_node):
    """A field the Messages API does not have is invalid_request_error naming it; an image
    block is refused by name; no session is made."""
    node, base = await _gateway(make_node)
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{base}/v1/messages",
                            json={**RAW, "messages": [_user("hi")], "bogus_field": 1})
        image = {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}
        r2 = await http.post(f"{base}/v1/messages",
                             json={**RAW, "messages": [_user([image])]})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == "invalid_request_error"
    assert "bogus_field" in body["error"]["message"]
    assert r2.status_code == 400 and "image" in r2.json()["error"]["message"]
    async with InfernodeClient(node.url) as c:
        assert (await c.sessions()).sessions == ()


async def test_a_system_message_inside_messages_and_context_management_are_accepted(make_node):
    """Claude Code's shapes: a ``system`` message after the first user message (text or
    blocks) is part of the prompt, and ``context_management`` is accepted and ignored."""
    _, base = await _gateway(make_node)
    clearing = {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}
    inside = [_user("hi"), {"role": "system", "content": [{"type": "text", "text": "Be terse."}]}]
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{base}/v1/messages", json={
            **RAW, "messages": inside, "context_management": clearing})
        counted = await http.post(f"{base}/v1/messages/count_tokens", json={
            "model": "claude-test", "messages": inside, "context_management": clearing})
        bare = await http.post(f"{base}/v1/messages/count_tokens", json={
            "model": "claude-test", "messages": [_user("hi")]})
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["type"] == "text"
    assert counted.status_code == 200, counted.text
    assert counted.json()["input_tokens"] > bare.json()["input_tokens"]


async def test_a_tool_described_in_19k_characters_is_accepted(make_node):
    """Claude Code's longest tool description (about 19k characters) is not refused."""
    _, base = await _gateway(make_node)
    long_tool = {"name": "Workflow", "description": "Plan the work. " * 1270,
                 "input_schema": WEATHER}
    counted = await _client(base).messages.count_tokens(
        model="claude-test", messages=[_user("hi")], tools=[long_tool])
    assert counted.input_tokens > 19_000 // 4


async def test_x_api_key_authenticates_and_a_wrong_key_is_an_authentication_error(
    make_node, tmp_path: Path
):
    """With API keys, Anthropic's x-api-key header is a key; a wrong one is a 401."""
    keys = tmp_path / "keys"
    keys.write_text("alice-key-0123456789 alice\n")
    _, base = await _gateway(make_node, api_keys=keys)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        await _client(base, "wrong-key").messages.create(messages=[_user("hi")], **GREEDY)
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    answer = await _client(base, "alice-key-0123456789").messages.create(
        messages=[_user("hi")], **GREEDY)
    assert answer.usage.output_tokens == 6


async def test_refusals_on_messages_routes_are_anthropic_errors(make_node):
    """A wrong method, an unknown route under /v1/messages and the concurrency limit answer
    in Anthropic's error shape, with Anthropic's error types."""
    node, base = await _gateway(make_node, openai_max_requests=1)
    # One request held open mid-body takes the only place.
    reader, writer = await asyncio.open_connection("127.0.0.1", node.gateway.port)
    writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    await until(lambda: node.gateway.app.asgi.active == 1, what="the held request counted")
    async with httpx.AsyncClient(timeout=30) as http:
        busy = await http.post(f"{base}/v1/messages", json=RAW)
        writer.close()
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        wrong = await http.get(f"{base}/v1/messages")
        missing = await http.post(f"{base}/v1/messages/batches", json=RAW)
    assert wrong.status_code == 405 and wrong.json()["type"] == "error"
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
