"""Anthropic Messages API response shapes: a message, its event stream, usage, errors.

Plain dicts in the shape Anthropic documents, so the ``anthropic`` SDK and Claude Code parse
them into their own types. Usage follows Anthropic's split: ``input_tokens`` are the prompt
tokens evaluated this turn, ``cache_read_input_tokens`` those whose KV state was reused, so
their sum is the whole prompt (nothing is "written" to a cache at a price here:
``cache_creation_input_tokens`` is 0). The stream's ``message_start`` cannot know the
prompt's usage yet (the node reports it with the answer); ``message_delta`` carries all of
it, and the SDK takes those numbers over.

An answer a stop sequence ended is ``stop_reason`` ``stop_sequence``, naming it (the engine
reports the prompt's stop string it matched); any other stop is ``end_turn``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from actors.gateway.calls import OpenCall
from actors.gateway.stream import ContentFilter, ToolCallRelay, progress_comment
from schemas.errors import InferError
from schemas.messages import DoneEvent, PromptProgressEvent, TokenEvent, ToolCallEvent

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 409: "invalid_request_error", 410: "not_found_error",
    413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
    500: "api_error", 503: "overloaded_error", 529: "overloaded_error",
}
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
         "aborted": "end_turn", "error": "end_turn"}


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error object."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"),
                                       "message": message}}


def usage(done: DoneEvent) -> dict[str, int]:
    """Anthropic usage: evaluated input, reused input, output, and what the context window
    left out of the history (infernode's ``dropped_input_tokens``, ``dropped_turns``)."""
    u = done.usage
    return {"input_tokens": u.prompt_tokens - u.cached_tokens,
            "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0,
            "dropped_input_tokens": u.dropped_tokens, "dropped_turns": u.dropped_turns}


def stop(done: DoneEvent) -> dict[str, str | None]:
    """``stop_reason`` and ``stop_sequence`` of an answer."""
    if done.finish_reason == "stop" and done.stop_sequence is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": done.stop_sequence}
    return {"stop_reason": _STOP[done.finish_reason], "stop_sequence": None}


def _input(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:  # the engine parsed the call, so this is a cut one: keep the text
        return {"arguments": arguments}


class MessageShape:
    """Ids and names shared by every object of one answer."""

    def __init__(self, message_id: str, model: str) -> None:
        self.id = message_id
        self.model = model

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model}

    def message(self, done: DoneEvent) -> dict[str, Any]:
        """A non-streamed ``message``."""
        content: list[dict[str, Any]] = []
        if done.text:
            content.append({"type": "text", "text": done.text})
        content += [{"type": "tool_use", "id": c.id, "name": c.function.name,
                     "input": _input(c.function.arguments)} for c in done.tool_calls]
        return {**self._head(), "content": content, **stop(done), "usage": usage(done)}

    async def stream(self, call: OpenCall) -> AsyncIterator[str]:
        """The answer as Anthropic's events; a failure once it began is an ``error`` event."""
        try:
            async for line in self._events(call):
                yield line
        except InferError as e:
            yield event("error", error_body(e.status, e.message))

    async def _events(self, call: OpenCall) -> AsyncIterator[str]:
        zero = {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0}
        yield event("message_start", {"type": "message_start", "message": {
            **self._head(), "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": zero}})
        # The engine parses calls unless tool_choice is none; only then is markup shown.
        shown = ContentFilter(hides_calls=call.turn.prompt.tool_choice != "none")
        relay, blocks = ToolCallRelay(), _Blocks()
        async with contextlib.aclosing(call.events(progress=True)) as events:
            async for ev in events:
                if isinstance(ev, PromptProgressEvent):
                    lines = [progress_comment(ev)]
                elif isinstance(ev, TokenEvent):
                    lines = blocks.text(shown.feed(ev.text))
                elif isinstance(ev, ToolCallEvent):
                    lines = [x for d in relay.deltas(ev) for x in blocks.call(d)]
                else:
                    lines = [*blocks.text(shown.flush()),
                             *(x for d in relay.rest(ev) for x in blocks.call(d)),
                             *blocks.close(), self._delta(ev)]
                for line in lines:
                    yield line
        yield event("message_stop", {"type": "message_stop"})

    def _delta(self, done: DoneEvent) -> str:
        return event("message_delta", {
            "type": "message_delta", "usage": usage(done), "delta": stop(done),
        })


class _Blocks:
    """Content blocks of one stream: text, then one ``tool_use`` block per call."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | int | None = None
        """``text``, the OpenAI index of the open call, or None."""
        self._closed: set[int] = set()

    def text(self, text: str) -> list[str]:
        """Lines that stream ``text`` into a text block."""
        if not text:
            return []
        lines = [] if self.open == "text" else self._start({"type": "text", "text": ""}, "text")
        return [*lines, self._delta({"type": "text_delta", "text": text})]

    def call(self, delta: dict[str, Any]) -> list[str]:
        """Lines for one OpenAI tool-call delta (the first of a call opens its block)."""
        at = delta["index"]
        if at in self._closed:  # a block cannot be reopened; done's answer holds the call
            return []
        lines = []
        if self.open != at:
            fn = delta.get("function", {})
            lines = self._start({"type": "tool_use", "id": delta.get("id", ""),
                                 "name": fn.get("name", ""), "input": {}}, at)
        arguments = delta.get("function", {}).get("arguments")
        if arguments:
            lines.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return lines

    def close(self) -> list[str]:
        """The stop of the open block, if any."""
        if self.open is None:
            return []
        if isinstance(self.open, int):
            self._closed.add(self.open)
        self.open = None
        return [event("content_block_stop", {"type": "content_block_stop",
                                             "index": self.index})]

    def _start(self, block: dict[str, Any], what: str | int) -> list[str]:
        lines = self.close()
        self.index += 1
        self.open = what
        return [*lines, event("content_block_start", {
            "type": "content_block_start", "index": self.index, "content_block": block})]

    def _delta(self, delta: dict[str, Any]) -> str:
        return event("content_block_delta", {"type": "content_block_delta",
                                             "index": self.index, "delta": delta})


def event(name: str, body: dict[str, Any]) -> str:
    """One server-sent event with its ``event:`` name."""
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return f"event: {name}\ndata: {data}\n\n"
