"""Tool calls streamed while they are generated, in OpenAI's delta shape.

``ToolCallStream`` reads the reply's text as the engine emits it. Inside a
``<tool_call>{...}</tool_call>`` block it follows the JSON object (strings, escapes,
nesting) just far enough to know where the ``name`` and ``arguments`` values lie: once
the name's string is complete it yields the call's first delta (index, id, name), then each
new piece of the arguments' JSON text as it arrives. ``parse_tool_calls`` still decides
what ``done`` carries; it takes its call ids from ``next_id`` so the ids match.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from schemas.tools import FunctionDelta, ToolCallDelta

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


class ToolCallStream:
    """Turns streamed reply text into ``ToolCallDelta`` items."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self._new_id = new_id
        self.ids: list[str] = []
        """Ids given to the calls seen so far, in order."""
        self._handed = 0
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
            return
        keep = next((n for n in range(min(len(buf), len(_OPEN) - 1), 0, -1)
                     if _OPEN.startswith(buf[-n:])), 0)
        self._outside = buf[len(buf) - keep:]

    def _block_char(self, ch: str, out: list[ToolCallDelta]) -> None:
        if self._closed:  # after the object: wait for the closing tag (or give up)
            self._outside += ch
            if self._outside.endswith(_CLOSE) or not _CLOSE.startswith(self._outside.strip()):
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
            self._args = ""


def _loads(inner: str) -> str | None:
    try:
        value = json.loads(f'"{inner}"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None
