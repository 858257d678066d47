"""A bound on how deeply a JSON body nests, checked before anything parses it.

Every door that takes JSON (the gateway's HTTP body, a prompt on the prompt subject, an ask)
checks this first. Python's ``json`` recurses once per level and raises ``RecursionError``
near 1,000; pydantic's parser stops at 200 with a sentence about recursion that names no
limit a client can keep to. 128 levels is far past any real request (a tool's JSON Schema
nested 30 objects deep is about 64 levels of JSON, wrapped in 4 of request) and well under
both, so every parser behind a door sees only bodies it handles.
"""

from __future__ import annotations

import re
from itertools import accumulate

from schemas.errors import ErrorCode, InferError

MAX_JSON_DEPTH = 128
"""Most levels of arrays and objects inside one another that a body may nest."""

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
"""A JSON string: brackets inside one are text, not nesting."""
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_CHUNK = 1 << 16
"""Brackets counted at a time between checks of the limit."""
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def json_depth(data: bytes, stop_past: int | None = None) -> int:
    """How deeply ``data`` nests arrays and objects (linear time, no recursion); with
    ``stop_past``, counting stops at the first level past it (a hostile body is not read
    to its end)."""
    shape = _NOT_BRACKET.sub(b"", _STRING.sub(b"", data))
    deepest = depth = 0
    for start in range(0, len(shape), _CHUNK):
        levels = list(accumulate(map(_STEP.__getitem__, shape[start:start + _CHUNK]),
                                 initial=depth))
        deepest, depth = max(deepest, max(levels)), levels[-1]
        if stop_past is not None and deepest > stop_past:
            break
    return deepest


def check_json_depth(data: bytes, what: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse ``data`` (400 naming the limit) when it nests deeper than ``limit``."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return  # cannot nest deeper than it has brackets: the usual, cheap case
    depth = json_depth(data, stop_past=limit)
    if depth > limit:
        raise InferError(
            ErrorCode.BAD_REQUEST,
            f"{what} nests arrays and objects more than {limit} levels deep (the limit)",
            {"param": "body", "limit": limit},
        )
