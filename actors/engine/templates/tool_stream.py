"""Tool calls streamed while they are generated, in OpenAI's delta shape.

``ToolCallStream`` reads the reply's text as the engine emits it. Inside a
``<tool_call>{...}</tool_call>`` block it follows the JSON object (strings, escapes,
nesting) just far enough to know where the ``name`` and ``arguments`` values lie: once
the name's string is complete it yields the call's first delta (index, id, name), then each
new piece of the arguments' JSON text as it arrives. ``parse_tool_calls`` still decides
what ``done`` carries; it takes its call ids from ``next_id`` so the ids match.

It also knows where a reply cut short left a call: ``unfinished`` names the open block's
start and the call as far as it was streamed (OpenAI answers a call cut by ``max_tokens``
with its truncated arguments and ``finish_reason: length``, never with the markup as text),
and ``closed`` counts whole calls, so a turn that may make one call (``parallel_tool_calls:
false``) ends after its first (``FirstCallEnds``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import NamedTuple

from actors.engine.interface import CancelToken
from actors.engine.templates.chat import parse_tool_calls
from schemas.chat import FunctionCall, ToolCall
from schemas.tools import FunctionDelta, ToolCallDelta

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


class Unfinished(NamedTuple):
    """A call block the reply ended inside."""

    start: int
    """Where its opening tag starts in the reply's text."""
    call: ToolCall | None
    """The call as streamed so far (arguments cut short); None while its name was not
    whole: nothing of it was streamed."""


class ToolCallStream:
    """Turns streamed reply text into ``ToolCallDelta`` items."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self._new_id = new_id
        self.ids: list[str] = []
        """Ids given to the calls seen so far, in order."""
        self.closed = 0
        """Calls whose block was closed by its tag."""
        self._handed = 0
        self._fed = 0  # characters read so far
        self._block_start = 0
        self._outside = ""  # text that may be the start of the opening tag
        self._in_block = False
        self._reset_block()

    def _reset_block(self) -> None:
        self._depth = 0
        self._in_string = self._escape = False
        self._key: str | None = None
        self._token = ""  # the depth-1 string being read (a key or the name's value)
        self._block_id: str | None = None
        self._value_of: str | None = None  # key whose value is being read at depth >= 1
        self._name: str | None = None
        self._args = ""  # argument text not yet handed out (held until the name is known)
        self._args_string = False
        self._args_begun = False
        self._args_sent = ""
        self._closed = False

    def next_id(self) -> str:
        """The id of the next parsed call: the streamed calls' ids first, in order."""
        if self._handed < len(self.ids):
            self._handed += 1
            return self.ids[self._handed - 1]
        self._handed += 1
        return self._new_id()

    def feed(self, text: str) -> list[ToolCallDelta]:
        """Deltas completed by ``text``."""
        out: list[ToolCallDelta] = []
        for ch in text:
            self._fed += 1
            if self._in_block:
                self._block_char(ch, out)
            else:
                self._outside_char(ch)
        self._flush_args(out)
        return out

    def _outside_char(self, ch: str) -> None:
        buf = self._outside + ch
        if buf.endswith(_OPEN):
            self._in_block, self._outside = True, ""
            self._reset_block()
            self._block_start = self._fed - len(_OPEN)
            return
        keep = next((n for n in range(min(len(buf), len(_OPEN) - 1), 0, -1)
                     if _OPEN.startswith(buf[-n:])), 0)
        self._outside = buf[len(buf) - keep:]

    def _block_char(self, ch: str, out: list[ToolCallDelta]) -> None:
        if self._closed:  # after the object: wait for the closing tag (or give up)
            self._outside += ch
            if self._outside.endswith(_CLOSE):
                self.closed += self._name is not None
                self._in_block, self._outside = False, ""
            elif not _CLOSE.startswith(self._outside.strip()):
                self._in_block, self._outside = False, ""
            return
        if self._depth == 0:
            if ch == "{":
                self._depth = 1
            elif not ch.isspace():
                self._in_block = False  # not a JSON object: plain text after all
            return
        self._value_char(ch, out)

    def _value_char(self, ch: str, out: list[ToolCallDelta]) -> None:
        reading_args = self._value_of == "arguments"
        if self._in_string:
            self._string_char(ch, reading_args)
            return
        if self._depth == 1 and ch in ",}":
            self._end_value(out)
            if ch == "}":
                self._depth, self._closed, self._outside = 0, True, ""
            return
        if ch == '"':
            self._in_string = True
            if self._depth == 1:
                self._token = ""
            if reading_args and self._depth == 1 and not self._args_begun:
                self._args_string = True
        elif ch == ":" and self._depth == 1 and self._value_of is None:
            self._value_of = self._key
            return
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
        if reading_args and not (ch.isspace() and not self._args_begun):
            self._args += ch
            self._args_begun = True

    def _string_char(self, ch: str, reading_args: bool) -> None:
        if reading_args:
            self._args += ch
        if self._escape:
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            self._in_string = False
            if self._depth == 1 and self._value_of is None:
                self._key = _loads(self._token)
            elif self._depth == 1 and self._value_of == "name" and self._name is None:
                self._name = _loads(self._token)
            return
        if self._depth == 1 and (self._value_of is None or self._value_of == "name"):
            self._token += ch

    def _end_value(self, out: list[ToolCallDelta]) -> None:
        if self._value_of == "arguments" and self._args_string:
            decoded = _loads(self._args[1:-1]) if self._args.endswith('"') else None
            self._args = decoded or ""
            self._args_string = False
        self._flush_args(out)
        self._value_of, self._key = None, None

    def _flush_args(self, out: list[ToolCallDelta]) -> None:
        if not self._in_block or self._name is None:
            return
        if self._block_id is None:
            self._block_id = self._new_id()
            self.ids.append(self._block_id)
            out.append(ToolCallDelta(
                index=len(self.ids) - 1, id=self._block_id, type="function",
                function=FunctionDelta(name=self._name),
            ))
        if self._args and not self._args_string:
            out.append(ToolCallDelta(
                index=len(self.ids) - 1, function=FunctionDelta(arguments=self._args)
            ))
            self._args_sent += self._args
            self._args = ""

    def unfinished(self) -> Unfinished | None:
        """The call block the text read so far ends inside, or None."""
        if not self._in_block:
            return None
        call = None
        if self._name is not None and self._block_id is not None:
            try:
                call = ToolCall(id=self._block_id, function=FunctionCall(
                    name=self._name, arguments=self._args_sent))
            except ValueError:  # pydantic: a name or arguments no call may have
                call = None
        return Unfinished(self._block_start, call)


class FirstCallEnds(CancelToken):
    """The cancel of a turn that may make one tool call: set by the turn's own cancel, or
    once ``calls`` has read a whole call (decode checks it before every token, so the reply
    ends right after the call's closing tag)."""

    def __init__(self, turn: CancelToken, calls: ToolCallStream) -> None:
        super().__init__()
        self.turn = turn
        self.calls = calls

    @property
    def cancelled(self) -> bool:
        """True once the turn is cancelled or its first call is whole."""
        return self.turn.cancelled or self.calls.closed > 0

    @property
    def ended_by_call(self) -> bool:
        """True when the first call, not a cancel, ended the reply."""
        return self.calls.closed > 0 and not self.turn.cancelled


def _loads(inner: str) -> str | None:
    try:
        value = json.loads(f'"{inner}"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def reply_calls(
    raw: str, finish: str, calls: ToolCallStream, ends: CancelToken
) -> tuple[str, tuple[ToolCall, ...], str]:
    """The reply's (content, tool calls, finish reason), read from its raw text.

    A reply cut short inside a call block (``finish`` ``length``) keeps its markup out of
    the content: the call goes with the arguments streamed so far, as OpenAI answers it,
    or not at all when its name was not whole. A turn limited to one call (``ends`` is a
    ``FirstCallEnds``) returns at most one, and ending after it is a ``tool_calls`` finish.
    """
    cut = calls.unfinished() if finish == "length" else None
    body = raw if cut is None else raw[: cut.start]
    text, parsed = parse_tool_calls(body, calls.next_id) if _OPEN in body else (body, ())
    if cut is not None:
        text = text.strip()
        parsed = (*parsed, cut.call) if cut.call is not None else parsed
    if isinstance(ends, FirstCallEnds):
        parsed = parsed[:1]
        if finish == "aborted" and ends.ended_by_call:
            finish = "stop"
    return text, parsed, "tool_calls" if parsed and finish == "stop" else finish
