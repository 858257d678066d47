"""The API keys file: one ``KEY AGENT`` pair a line; ``#`` starts a comment.

Each key belongs to one agent, and an agent sees only its own sessions: the gateway scopes
every session id (and every conversation hash) by the agent of the key that sent it.
"""

from __future__ import annotations

import re
from pathlib import Path

AGENT_RE = re.compile(r"[A-Za-z0-9-]{1,32}")
"""Agent names: no ``_``, so ``<agent>_<session>`` on the node splits one way only."""


class ApiKeysError(ValueError):
    """The keys file cannot be used; the message names the line and the fix."""


def read_api_keys(path: Path) -> dict[str, str]:
    """Bearer key → agent, from ``path``."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ApiKeysError(f"cannot read the API keys file {str(path)!r}: {e.strerror}") from e
    keys: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) < 16 or not AGENT_RE.fullmatch(parts[1]):
            raise ApiKeysError(
                f"{path}:{n}: write `KEY AGENT`: a key of at least 16 characters, then an "
                "agent name of 1-32 letters, digits or '-'"
            )
        if parts[0] in keys:
            raise ApiKeysError(f"{path}:{n}: this key is already given to {keys[parts[0]]}")
        keys[parts[0]] = parts[1]
    if not keys:
        raise ApiKeysError(f"the API keys file {str(path)!r} holds no keys")
    return keys
