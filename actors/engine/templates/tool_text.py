"""Tool text for chat templates that do not handle tools themselves.

Many GGUF templates (SmolLM2's among them) read neither ``tools`` nor ``tool_calls``. For
them the tools reach the model as the hermes block the built-in templates write
(``tools_block``), at the end of the system message, and each assistant call is written into
its message's content as the canonical ``<tool_call>{...}</tool_call>`` block, so no call a
client sends back disappears from the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from actors.engine.templates.sandbox import tojson


def tools_block(tools: Sequence[Mapping[str, object]]) -> str:
    """The hermes tools block, as the built-in templates' ``tools_text`` macro writes it."""
    listed = "".join("\n" + tojson(dict(t)) for t in tools)
    return (
        "You can call these functions (JSON schemas):\n<tools>" + listed + "\n</tools>\nTo "
        'call one, reply with <tool_call>{"name": <name>, "arguments": <object>}</tool_call>, '
        "one block per call."
    )


def with_tools_in_system(
    messages: list[dict[str, object]], tools: Sequence[Mapping[str, object]]
) -> list[dict[str, object]]:
    """``messages`` with the tools block ending the system message (one is added if none)."""
    block = tools_block(tools)
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{block}" if first["content"] else block
        return [first, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def calls_in_content(message: dict[str, object]) -> dict[str, object]:
    """``message`` with its tool calls written after its content as canonical blocks."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    blocks = [
        "<tool_call>" + tojson({"name": c["function"]["name"],
                                "arguments": c["function"]["arguments"]}) + "</tool_call>"
        for c in calls
    ]
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    out["content"] = "\n".join([str(message["content"])] * bool(message["content"]) + blocks)
    return out
