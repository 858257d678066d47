"""What a streamed answer shows: its text without tool-call markup, and its tool calls as the
engine streamed them, in OpenAI's ``delta.tool_calls`` shape.

The engine publishes a ``tool_call`` event for each piece of a call while it is generated
(the call's index, id and name first, then pieces of its arguments); those are passed on as
they come, never recovered from the text again. The text the call was written in also
arrives as tokens; it is held back from ``content`` once a call opens, as the non-streamed
answer leaves it out. At ``done`` whatever of its parsed calls the stream did not carry is
sent too (a call it missed whole, the tail of cut arguments), so a client that adds the
deltas up holds every call ``done`` holds.

Before the first token, a long prefill's progress goes out as an SSE comment (as
llama-server's ``prompt_progress``): clients skip comments, and one with an idle timeout
sees the stream alive while the prompt is evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from schemas.chat import ToolCall
from schemas.messages import DoneEvent, PromptProgressEvent, ToolCallEvent

_TOOL_OPEN = "<tool_call>"


class ContentFilter:
    """Streams text up to a tool call's markup; the call itself arrives as tool-call deltas."""

    def __init__(self, hides_calls: bool = True) -> None:
        self._held = ""
        self._in_call = False
        self._hides_calls = hides_calls

    def feed(self, text: str) -> str:
        """What of ``text`` may be shown now."""
        if not self._hides_calls:
            return text
        if self._in_call:
            return ""
        text = self._held + text
        at = text.find(_TOOL_OPEN)
        if at >= 0:
            self._in_call, self._held = True, ""
            return text[:at]
        # Hold back a tail that could still grow into the opening tag.
        keep = next((k for k in range(min(len(text), len(_TOOL_OPEN) - 1), 0, -1)
                     if _TOOL_OPEN.startswith(text[-k:])), 0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Held text once the turn is done."""
        held, self._held = self._held, ""
        return "" if self._in_call else held


@dataclass
class _Streamed:
    index: int
    arguments: str


class ToolCallRelay:
    """The tool-call deltas of one streamed answer."""

    def __init__(self) -> None:
        self._calls: dict[str, _Streamed] = {}
        self._by_index: dict[int, _Streamed] = {}

    def deltas(self, event: ToolCallEvent) -> list[dict[str, Any]]:
        """The event's deltas in OpenAI's chunk shape."""
        out = []
        for delta in event.tool_calls:
            seen = self._by_index.get(delta.index)
            if seen is None:
                seen = self._by_index[delta.index] = _Streamed(delta.index, "")
                if delta.id is not None:
                    self._calls[delta.id] = seen
            seen.arguments += delta.function.arguments
            out.append(delta.model_dump(exclude_none=True))
        return out

    def rest(self, done: DoneEvent) -> list[dict[str, Any]]:
        """Deltas that complete ``done``'s calls: a call the stream missed goes whole, a call
        whose arguments it carried in part gets their tail."""
        out: list[dict[str, Any]] = []
        for call in done.tool_calls:
            seen = self._calls.get(call.id)
            if seen is None:
                index = max(self._by_index, default=-1) + 1
                self._by_index[index] = self._calls[call.id] = _Streamed(index, "")
                out.append(_whole(call, index))
                continue
            arguments = call.function.arguments
            if len(arguments) > len(seen.arguments) and arguments.startswith(seen.arguments):
                out.append({"index": seen.index,
                            "function": {"arguments": arguments[len(seen.arguments):]}})
        return out


def progress_comment(event: PromptProgressEvent) -> str:
    """A prefill's progress as an SSE comment: ``: prompt_progress {"done":…,"total":…}``."""
    body = {"done": event.done, "total": event.total, "cached": event.cached,
            "elapsed_ms": round(event.elapsed_ms)}
    return f": prompt_progress {json.dumps(body, separators=(',', ':'))}\n\n"


def _whole(call: ToolCall, index: int) -> dict[str, Any]:
    return {"index": index, "id": call.id, "type": "function", "function": {
        "name": call.function.name, "arguments": call.function.arguments}}
