"""Several tool calls in one reply, through every door with the official SDKs: each call
streams with its own ``index`` (chat), is its own ``function_call`` item (Responses) and its
own ``tool_use`` block (Messages); ``parallel_tool_calls: false`` (Anthropic's
``disable_parallel_tool_use``) ends the reply after its first call.

The tiny model's weights are random, so its choices are scripted (``script_sampler``):
prefill, decode, the engine's parsing and the gateway stay real.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

import actors.engine.sampling as sampling_mod

CALLS = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
         '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>')
"""The reply the model is made to write: two calls."""
WANTED = [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]
PARAMS = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}}},
          "get_time": {"type": "object", "properties": {"tz": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": p}}
         for n, p in PARAMS.items()]


@pytest.fixture
async def base(make_node, monkeypatch) -> str:
    """A gateway whose model writes ``CALLS`` (then ends its turn) on every turn."""
    node = await make_node(openai_port=0, speculate="off")
    backend = node.engine.backend
    script = backend.tokenizer.encode(CALLS, add_bos=False) + [backend.eos_id]
    real = sampling_mod.Sampler.sample
    turn: dict[str, Any] = {"sampler": None, "queue": []}

    def scripted(self, logits, recent, allowed=None):  # type: ignore[no-untyped-def]
        if turn["sampler"] is not self:  # a new turn: the script from its start
            turn["sampler"], turn["queue"] = self, list(script)
        return turn["queue"].pop(0) if turn["queue"] else real(self, logits, recent, allowed)

    monkeypatch.setattr(sampling_mod.Sampler, "sample", scripted)
    return f"http://127.0.0.1:{node.gateway.port}"


def _openai(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def _chat(**kwargs: Any) -> dict[str, Any]:
    return {"model": "any", "messages": [{"role": "user", "content": "Paris: weather, time?"}],
            "tools": TOOLS, "max_tokens": 200, "temperature": 0, **kwargs}


async def test_two_calls_stream_with_indexes_0_and_1_and_add_up_to_the_answer(base):
    """Each call's deltas carry its own index; added up they are the two calls."""
    client = _openai(base)
    chunks = [c async for c in await client.chat.completions.create(stream=True, **_chat())]
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    firsts = [d for d in deltas if d.id is not None]
    assert [d.index for d in firsts] == [0, 1] and len({d.id for d in firsts}) == 2
    assert [d.function.name for d in firsts] == ["get_weather", "get_time"]
    arguments = ["".join(d.function.arguments or "" for d in deltas if d.index == i)
                 for i in (0, 1)]
    assert [json.loads(a) for a in arguments] == [w for _, w in WANTED]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    whole = await client.chat.completions.create(**_chat())
    calls = whole.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == WANTED


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_parallel_tool_calls_false_ends_the_reply_after_its_first_call(base, stream):
    """With ``parallel_tool_calls: false`` the model's second call is never generated."""
    client = _openai(base)
    request = _chat(parallel_tool_calls=False)
    if stream:
        chunks = [c async for c in await client.chat.completions.create(stream=True, **request)]
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
        assert {d.index for d in deltas} == {0} and deltas[0].function.name == "get_weather"
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = None
    else:
        answer = await client.chat.completions.create(**request)
        [call] = answer.choices[0].message.tool_calls or []
        assert (call.function.name, json.loads(call.function.arguments)) == WANTED[0]
        finish, usage = answer.choices[0].finish_reason, answer.usage
    assert finish == "tool_calls"
    if usage is not None:  # generation stopped at the first call's closing tag
        assert usage.completion_tokens < len(CALLS) // 2 + 10


async def test_two_calls_are_two_function_call_items_of_a_response(base):
    """The Responses API gives each call its own output item, streamed and whole."""
    client = _openai(base)
    tools = [{"type": "function", "name": n, "parameters": p} for n, p in PARAMS.items()]
    request = {"model": "any", "input": "Paris: weather, time?", "tools": tools,
               "temperature": 0, "max_output_tokens": 200}
    events = [e async for e in await client.responses.create(stream=True, **request)]
    added = [e.item for e in events if e.type == "response.output_item.added"
             and e.item.type == "function_call"]
    assert [i.name for i in added] == ["get_weather", "get_time"]
    assert len({e.output_index for e in events if e.type ==
                "response.function_call_arguments.done"}) == 2
    final = events[-1].response
    items = [i for i in final.output if i.type == "function_call"]
    assert [(i.name, json.loads(i.arguments)) for i in items] == WANTED
    assert len({i.call_id for i in items}) == 2
    whole = await client.responses.create(**request)
    assert [(i.name, json.loads(i.arguments)) for i in whole.output
            if i.type == "function_call"] == WANTED
    one = await client.responses.create(parallel_tool_calls=False, **request)
    assert [i.name for i in one.output if i.type == "function_call"] == ["get_weather"]


async def test_two_calls_are_two_tool_use_blocks_and_disabling_parallel_use_leaves_one(base):
    """The Messages API gives each call its own ``tool_use`` block, streamed and whole."""
    client = anthropic.AsyncAnthropic(base_url=base, api_key="unused", max_retries=0)
    tools = [{"name": n, "input_schema": p} for n, p in PARAMS.items()]
    request = {"model": "claude-test", "max_tokens": 200, "tools": tools,
               "messages": [{"role": "user", "content": "Paris: weather, time?"}]}
    async with client.messages.stream(**request) as stream:
        starts = [e.content_block for e in [x async for x in stream]
                  if e.type == "content_block_start" and e.content_block.type == "tool_use"]
        final = await stream.get_final_message()
    assert [b.name for b in starts] == ["get_weather", "get_time"]
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in uses] == WANTED and final.stop_reason == "tool_use"
    whole = await client.messages.create(**request)
    assert [(b.name, b.input) for b in whole.content if b.type == "tool_use"] == WANTED
    one = await client.messages.create(
        **request, tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [b.name for b in one.content if b.type == "tool_use"] == ["get_weather"]
