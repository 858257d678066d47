"""Built-in chat templates of today's model families: llama-3, gemma and phi-3.

They follow the rules of the built-in chatml (see ``templates``): an assistant turn is the
generation prompt, its content verbatim, its tool calls as canonical blocks, then the turn's
end marker, so a reply re-renders as the prompt plus its raw text. One source serves every
family; a family supplies its turn header, its end marker, whether the text starts with
BOS, and how it carries the roles it lacks (gemma and phi-3 have no tool role: a tool result
is a user turn holding ``<tool_response>...</tool_response>``; gemma has no system role: the
system text opens the first user turn, as gemma's own template does).

Each family names its end-of-turn ``marker`` and the ``tokens`` that identify its vocabulary,
so a GGUF without a template can get the family its vocabulary was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How one family writes a conversation."""

    head: str
    """Jinja expression for a turn's header, given ``role``."""
    end: str
    """The end-of-turn marker (a stop string whenever it is not an end token of the model)."""
    after_end: str = ""
    """Text after the marker (a newline in most families)."""
    bos: bool = False
    """Whether the text starts with ``bos_token``."""
    merge_system: bool = False
    """No system role: the system text opens the first user turn."""
    tool_as_user: bool = False
    """No tool role: tool results are user turns with ``<tool_response>`` blocks."""
    tool_role: str = "tool"
    """The role name a tool result gets when the family has one."""
    tokens: tuple[str, ...] = ()
    """Special tokens whose presence in a vocabulary marks the family."""


FAMILIES: dict[str, Family] = {
    "llama-3": Family(
        head="'<|start_header_id|>' + role + '<|end_header_id|>\\n\\n'", end="<|eot_id|>",
        bos=True, tool_role="ipython", tokens=("<|start_header_id|>", "<|eot_id|>"),
    ),
    "gemma": Family(
        head="'<start_of_turn>' + ('model' if role == 'assistant' else role) + '\\n'",
        end="<end_of_turn>", after_end="\n", bos=True, merge_system=True, tool_as_user=True,
        tokens=("<start_of_turn>", "<end_of_turn>"),
    ),
    "phi-3": Family(
        head="'<|' + role + '|>\\n'", end="<|end|>", after_end="\n", tool_as_user=True,
        tokens=("<|user|>", "<|assistant|>", "<|end|>"),
    ),
}
"""Families by the name ``--chat-template`` takes."""

_SOURCE = r"""
{%- macro head(role) %}{{ STYLE_HEAD }}{% endmacro -%}
{%- set ns = namespace(start=0, prefix='', system=none) -%}
{%- if STYLE_BOS %}{{ bos_token }}{% endif -%}
{%- if messages and messages[0].role == 'system' -%}
{%- set ns.system = messages[0].content %}{% set ns.start = 1 -%}
{%- endif -%}
{%- if tools -%}
{%- set ns.system = (ns.system + '\n\n' if ns.system is not none else '') + tools_text() -%}
{%- endif -%}
{%- if ns.system is not none -%}
{%- if STYLE_MERGE_SYSTEM -%}
{%- set ns.prefix = ns.system + '\n\n' -%}
{%- if not messages[ns.start:] or messages[ns.start].role != 'user' -%}
{{ head('user') + ns.system + STYLE_END }}{% set ns.prefix = '' %}
{%- endif -%}
{%- else -%}
{{ head('system') + ns.system + STYLE_END }}
{%- endif -%}
{%- endif -%}
{%- for message in messages[ns.start:] -%}
{%- set role = message.role -%}
{%- set content = message.content -%}
{%- if role == 'tool' -%}
{%- if STYLE_TOOL_AS_USER -%}
{%- set role = 'user' %}{% set content = '<tool_response>' + content + '</tool_response>' -%}
{%- else %}{% set role = STYLE_TOOL_ROLE %}{% endif -%}
{%- endif -%}
{%- if role == 'user' and ns.prefix -%}
{%- set content = ns.prefix + content %}{% set ns.prefix = '' -%}
{%- endif -%}
{{ head(role) + content }}
{%- if message.role == 'assistant' %}{{ tool_calls_text(message) }}{% endif -%}
{{ STYLE_END }}
{%- endfor -%}
{%- if add_generation_prompt %}{{ head('assistant') }}{% endif -%}
"""


def family_source(name: str, common: str) -> str:
    """The jinja source of family ``name``, after the shared macros in ``common``."""
    f = FAMILIES[name]
    values = {
        "HEAD": f.head,
        "END": repr(f.end + f.after_end),
        "BOS": str(f.bos).lower(),
        "MERGE_SYSTEM": str(f.merge_system).lower(),
        "TOOL_AS_USER": str(f.tool_as_user).lower(),
        "TOOL_ROLE": repr(f.tool_role),
    }
    source = _SOURCE
    for key, value in values.items():
        source = source.replace(f"STYLE_{key}", f"({value})")
    return common + source
