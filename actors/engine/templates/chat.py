"""Chat templates: GGUF templates in a guarded sandbox, built-in fallbacks, tool calls.

Templates render through ``templates/sandbox.py`` (a GGUF template is untrusted input). The
context is HF's: ``messages`` as plain OpenAI-shaped dicts (tool-call ``arguments`` as a dict
when they hold a JSON object, a missing ``content`` as ``""``), ``tools``, ``bos_token``,
``eos_token``, ``add_generation_prompt``, and the helpers ``raise_exception`` and
``strftime_now``.

Raw-text-preserving rendering. The engine reuses a session's KV cache only if the next
prompt's tokens extend the tokens already evaluated, which end with what the model generated.
So ``render(history + [reply], add_generation_prompt=False)`` must start with
``render(history, add_generation_prompt=True) + raw``, ``raw`` being the exact generated
text. Two pieces make that hold:

- ``render(..., raw_assistant={i: raw})`` renders assistant message ``i`` with ``raw`` as its
  content, verbatim and without ``tool_calls`` (the raw text already holds its
  ``<tool_call>`` blocks). The engine keeps each reply's raw text (and the token ids that
  spell it) next to the parsed message it returns to the client.
- The fallbacks write an assistant turn as: the generation prompt, the content exactly as
  given, then the turn's end. Tool calls follow the content as canonical blocks
  (``format_tool_call``), so a reply written in canonical form re-renders exactly even from
  its parsed (content, tool_calls). ``ChatTemplate.extends_prefix()`` probes any template for
  the property; GGUF templates that trim or rewrite content may lack it, which costs cache
  reuse, not correctness.

Tools reach the model through the template: a template that uses ``tools`` gets them as HF
chat templates expect (a list of OpenAI tool dicts); one that does not (many GGUF templates,
e.g. SmolLM2's) gets the hermes tools block (``tools_block``) at the end of its system
message, or in a system message of its own. Likewise a template that never reads
``tool_calls`` gets each call written into its message's content as a canonical block, so a
call the client sends back never disappears from the prompt.

Tool calls are hermes-style ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
blocks, one per call, after any content, separated by newlines. In chatml a tool result is
its own ``<|im_start|>tool`` turn; llama-2 and mistral have no tool role, so a result is
``<tool_response>...</tool_response>`` inside an ``[INST]`` block shared with neighbouring
user turns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

import jinja2
import jinja2.meta

from actors.engine.templates.families import FAMILIES, family_source
from actors.engine.templates.sandbox import (
    GuardedEnvironment,
    TemplateError,
    render_guarded,
    tojson,
)
from actors.engine.templates.tool_text import calls_in_content, tools_block, with_tools_in_system
from schemas.chat import ChatMessage, FunctionCall, ToolCall

__all__ = [
    "FALLBACK_SOURCES",
    "TEMPLATE_CHOICES",
    "ChatTemplate",
    "TemplateError",
    "format_tool_call",
    "parse_tool_calls",
    "tools_block",
]

MAX_SOURCE_CHARS = 200_000
"""Longest template source accepted; real templates are a few thousand characters."""
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_DECODER = json.JSONDecoder()

# -- built-in templates ---------------------------------------------------------------------
# Everything is written with {{ }} so no stray whitespace leaks; assistant content is written
# verbatim right after the generation prompt (see the module docstring).
_COMMON = r"""
{%- macro tool_calls_text(message) -%}
{%- for call in message.tool_calls -%}
{%- if not loop.first or message.content %}{{ '\n' }}{% endif -%}
{%- set payload = {'name': call.function.name, 'arguments': call.function.arguments} -%}
{{ '<tool_call>' + (payload | tojson) + '</tool_call>' }}
{%- endfor -%}
{%- endmacro -%}
{%- macro tools_text() -%}
{{ 'You can call these functions (JSON schemas):\n<tools>' }}
{%- for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor -%}
{{ '\n</tools>\nTo call one, reply with <tool_call>{"name": <name>, "arguments": <object>}'
   + '</tool_call>, one block per call.' }}
{%- endmacro -%}
"""

_CHATML = _COMMON + r"""
{%- set ns = namespace(start=0) -%}
{%- if tools -%}
{{ '<|im_start|>system\n' }}
{%- if messages and messages[0].role == 'system' -%}
{{ messages[0].content + '\n\n' }}{% set ns.start = 1 %}
{%- endif -%}
{{ tools_text() + '<|im_end|>\n' }}
{%- endif -%}
{%- for message in messages[ns.start:] -%}
{{ '<|im_start|>' + message.role + '\n' + message.content }}
{%- if message.role == 'assistant' %}{{ tool_calls_text(message) }}{% endif -%}
{{ '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif -%}
"""

# [INST] styles: consecutive system/user/tool messages share one [INST] block; STYLE_* are
# substituted per style before compiling.
_INST = _COMMON + r"""
{%- set ns = namespace(open=false, sep=false, tools=tools and tools | length > 0, first=true) -%}
{%- for message in messages -%}
{%- if message.role == 'assistant' -%}
{{ message.content + tool_calls_text(message) + STYLE_END }}
{%- else -%}
{%- if not ns.open -%}
{{ (bos_token if ns.first or STYLE_BOS_EACH else '') + '[INST] ' }}
{%- set ns.open = true %}{% set ns.sep = false %}{% set ns.first = false -%}
{%- if ns.tools and message.role != 'system' -%}
{{ STYLE_SYS_OPEN + tools_text() + STYLE_SYS_CLOSE }}{% set ns.tools = false %}
{%- endif -%}
{%- endif -%}
{%- if ns.sep %}{{ '\n' }}{% endif -%}
{%- if message.role == 'system' -%}
{{ STYLE_SYS_OPEN + message.content + ('\n\n' + tools_text() if ns.tools else '')
   + STYLE_SYS_CLOSE }}
{%- set ns.tools = false %}{% set ns.sep = false -%}
{%- elif message.role == 'tool' -%}
{{ '<tool_response>' + message.content + '</tool_response>' }}{% set ns.sep = true %}
{%- else -%}
{{ message.content }}{% set ns.sep = true %}
{%- endif -%}
{%- if loop.last or loop.nextitem.role == 'assistant' -%}
{{ ' [/INST]' }}{% set ns.open = false %}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
"""

_INST_STYLES = {
    "llama-2": {"END": "' ' + eos_token", "BOS_EACH": "true",
                "SYS_OPEN": r"'<<SYS>>\n'", "SYS_CLOSE": r"'\n<</SYS>>\n\n'"},
    "mistral": {"END": "eos_token", "BOS_EACH": "false",
                "SYS_OPEN": "''", "SYS_CLOSE": r"'\n\n'"},
}


def _inst_source(style: str) -> str:
    source = _INST
    for key, value in _INST_STYLES[style].items():
        source = source.replace(f"STYLE_{key}", f"({value})")
    return source


FALLBACK_SOURCES: dict[str, str] = {
    "chatml": _CHATML,
    "llama-2": _inst_source("llama-2"),
    "mistral": _inst_source("mistral"),
    **{name: family_source(name, _COMMON) for name in FAMILIES},
}
"""Built-in templates by name."""
TEMPLATE_CHOICES = ("auto", "gguf", *FALLBACK_SOURCES)
"""Names ``select_template`` accepts (besides the path of a jinja file)."""


# -- messages and tool calls ----------------------------------------------------------------
def format_tool_call(name: str, arguments: str) -> str:
    """The canonical block for one call, as the fallbacks render it and the parser reads it."""
    return "<tool_call>" + tojson({"name": name, "arguments": _arguments_value(arguments)}) + (
        "</tool_call>"
    )


def _arguments_value(arguments: str) -> object:
    # HF templates expect arguments as a mapping (they iterate or tojson it).
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return arguments
    return value if isinstance(value, dict) else arguments


def _message_dict(message: ChatMessage, raw: str | None) -> dict[str, object]:
    if raw is not None:
        if message.role != "assistant":
            raise TemplateError(f"raw text was given for a {message.role} message; only "
                                "assistant messages have generated text")
        return {"role": "assistant", "content": raw}
    # Templates concatenate content, so a missing one is the empty string.
    out: dict[str, object] = {"role": message.role, "content": message.content or ""}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": _arguments_value(c.function.arguments)}}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def parse_tool_calls(
    text: str, id_factory: Callable[[], str]
) -> tuple[str, tuple[ToolCall, ...]]:
    """Split generated text into (content without tool-call blocks, stripped; the calls).

    A block whose JSON is malformed, or lacks a name, stays in the content. Object arguments
    are stored in the canonical JSON form that ``format_tool_call`` writes back. The JSON is
    decoded before the closing tag is looked for, so a name or argument that itself holds
    ``</tool_call>`` does not end its block early.
    """
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    search = 0
    while (start := text.find(_OPEN, search)) >= 0:
        end, data = _block_at(text, start + len(_OPEN))
        call = _parse_block(data, id_factory) if end is not None else None
        if end is None or call is None:
            search = start + len(_OPEN)
            continue
        kept.append(text[pos:start])
        calls.append(call)
        pos = search = end
    kept.append(text[pos:])
    return "".join(kept).strip(), tuple(calls)


def _block_at(text: str, at: int) -> tuple[int | None, object]:
    """(end of the block, its JSON value) for a block whose JSON starts after ``at``."""
    body = _skip_space(text, at)
    try:
        data, after = _DECODER.raw_decode(text, body)
    except (ValueError, RecursionError):
        return None, None
    close = _skip_space(text, after)
    if not text.startswith(_CLOSE, close):
        return None, None
    return close + len(_CLOSE), data


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


def _parse_block(data: object, id_factory: Callable[[], str]) -> ToolCall | None:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    args = data.get("arguments", {})
    if isinstance(args, dict):
        args = tojson(args)
    if not isinstance(args, str):
        return None
    try:
        return ToolCall(id=id_factory(), function=FunctionCall(name=data["name"], arguments=args))
    except ValueError:  # pydantic: empty or overlong name, overlong arguments
        return None


# -- the template ---------------------------------------------------------------------------
class ChatTemplate:
    """A compiled chat template; ``render`` is thread-safe."""

    def __init__(
        self,
        source: str,
        bos_token: str = "",
        eos_token: str = "",
        *,
        name: str = "custom",
        time_limit_s: float = 1.0,
        max_output_chars: int = 4_000_000,
    ) -> None:
        if len(source) > MAX_SOURCE_CHARS:
            raise TemplateError(f"the chat template is {len(source)} characters long; at most "
                                f"{MAX_SOURCE_CHARS} are accepted")
        self.name = name
        self.source = source
        self.note = ""
        """Why this template was chosen, when it is a fallback."""
        self.end_marker: str | None = None
        """Text that ends an assistant turn, when known (built-ins); see ``turn_stops``."""
        self.bos_token, self.eos_token = bos_token, eos_token
        self.time_limit_s = time_limit_s
        self.max_output_chars = max_output_chars
        env = GuardedEnvironment(max_output_chars)
        try:
            self._template = env.from_string(source)
            names = jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"the chat template does not parse: {e.message} (line "
                                f"{e.lineno})") from e
        except (TemplateError, RecursionError, MemoryError) as e:
            raise TemplateError(f"the chat template does not compile: {e}") from e
        self.reads_tools = "tools" in names
        """Whether the template renders ``tools`` itself (else the tools block is added)."""
        self.reads_tool_calls = "tool_calls" in source
        """Whether the template renders ``tool_calls`` (else calls are written as content)."""

    def render(
        self,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = True,
        *,
        raw_assistant: Mapping[int, str] | None = None,
        tools: Sequence[Mapping[str, object]] | None = None,
    ) -> str:
        """The prompt text; ``raw_assistant[i]`` replaces assistant message ``i`` verbatim."""
        raw = raw_assistant or {}
        dicts = [_message_dict(m, raw.get(i)) for i, m in enumerate(messages)]
        if not self.reads_tool_calls:
            dicts = [calls_in_content(d) for d in dicts]
        if tools and not self.reads_tools:
            dicts = with_tools_in_system(dicts, tools)
        context = {
            "messages": dicts,
            "tools": [dict(t) for t in tools] if tools else None,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_generation_prompt": add_generation_prompt,
        }
        text = render_guarded(
            self._template, context, self.time_limit_s, 4 * self.max_output_chars
        )
        if len(text) > self.max_output_chars:
            raise TemplateError(f"the chat template wrote a {len(text)}-character prompt; at "
                                f"most {self.max_output_chars} are allowed")
        return text

    def extends_prefix(self) -> bool:
        """Whether a reply re-renders as the prompt plus its raw text (see module docstring)."""
        raw = " Let me check.\n" + format_tool_call("probe", '{"q": 1}') + "\n"
        for history in (_PROBE_HISTORY, _PROBE_HISTORY[1:]):
            reply = ChatMessage(role="assistant", content="x")
            try:
                prompt = self.render(history)
                full = self.render([*history, reply], False, raw_assistant={len(history): raw})
            except TemplateError:
                continue
            return full.startswith(prompt + raw)
        return False


_PROBE_HISTORY = (
    ChatMessage(role="system", content="You are helpful."),
    ChatMessage(role="user", content="Hi"),
    ChatMessage(role="assistant", content="Hello."),
    ChatMessage(role="user", content="Thanks"),
)
