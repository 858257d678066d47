"""What a llama.cpp library logged while it worked, so a refusal can quote the library's reason.

Both libraries report why they refuse a model only through their log callback ("error
loading model: cannot find tokenizer scores in model file") and return a null handle. The
callbacks feed a ``LibraryLog``; a load runs inside ``capture()`` and, on failure, its
``reason`` is the library's own sentence instead of "could not load".
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator

_ERRORS = (
    re.compile(r"\berror\b", re.I),
    re.compile(r"\b(failed|cannot|invalid|unsupported)\b", re.I),
)
"""What an error line looks like, most telling first (a load's last line is only "failed")."""
_PREFIX = re.compile(r"^(?:[A-Za-z_][\w:]*:\s+)+")
"""``function_name: `` prefixes llama.cpp puts before its messages."""
MAX_LINES = 400
"""Most lines one capture keeps (a load logs a few dozen)."""


class LibraryLog:
    """Collects log text while a ``capture()`` is open; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._captures: list[list[str]] = []
        self._partial = ""

    def write(self, text: str) -> None:
        """Text from the library's callback (pieces may split or join lines)."""
        with self._lock:
            if not self._captures:
                return
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
            for capture in self._captures:
                capture.extend(line for line in lines if line.strip())
                del capture[:-MAX_LINES]

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        """Collect every line logged inside the block into the yielded list."""
        lines: list[str] = []
        with self._lock:
            self._captures.append(lines)
        try:
            yield lines
        finally:
            with self._lock:
                if self._partial.strip():
                    lines.append(self._partial)
                self._partial = ""
                # By identity: two captures holding equal lines are still two captures.
                self._captures = [c for c in self._captures if c is not lines]


def refusal_reason(lines: list[str]) -> str | None:
    """The library's own words for a failure: its first error line, without function names."""
    for pattern in _ERRORS:
        for line in lines:
            if pattern.search(line):
                return _PREFIX.sub("", line.strip()) or line.strip()
    return None


def summary(lines: list[str], limit: int = 600) -> str:
    """Everything the library logged about one failure, on one line, without function names:
    a refused decode explains itself over several lines ("... positions ...: Y = X + 1")."""
    text = " ".join(_PREFIX.sub("", line.strip()) for line in lines if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."
