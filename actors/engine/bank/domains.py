"""Trust domains: which sessions may restore each other's banked KV prefixes.

A content-addressed bank shared by everyone is a side channel: how much of a prompt is
already cached (``cached_tokens``, and the time to the first token) tells one agent what
another sent. So snapshots are shared only inside one trust domain, and the domain is
mixed into every content address (as vLLM's ``cache_salt`` is into its block hashes): a
lookup from another domain cannot even find the entry.

The domain must come from something an agent cannot forge: its session id, since the
subjects of a session are granted to its owner alone. The gateway names an agent's
sessions ``<agent>_<session>`` (agent names have no ``_``), so by default

- a session ``<agent>_<rest>`` belongs to the domain of that agent;
- any other session is a domain of its own.

An operator may declare groups (``--bank-share-groups``): sessions or agents matching a
group's patterns share with each other, and with nobody else. The first group that matches
wins.

On the embedded server of ``infernode up`` every client is one NATS user (the node's
``infernode-client``, whose password is in the data directory), and a gateway without API
keys lets every HTTP client name every session: there the sessions no agent prefix claims
are one trust domain (``LOCAL_USER``), so an agent's forks and side requests restore what
its main conversation banked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

GROUP_NAME_RE = re.compile(r"[A-Za-z0-9-]{1,32}")
"""Names of share groups."""
_PATTERN_RE = re.compile(r"[A-Za-z0-9_\-*?\[\]!]{1,128}")
"""Patterns: session id characters and the glob characters ``* ? [ ] !``."""


class ShareGroupsError(ValueError):
    """A share-groups setting cannot be read; the message names the part and the fix."""


def agent_of(session: str) -> str | None:
    """The gateway agent a session id names (``<agent>_<rest>``), or None."""
    agent, sep, _ = session.partition("_")
    return agent if sep and agent else None


@dataclass(frozen=True)
class ShareGroups:
    """The groups an operator declared: name → patterns over session ids or agent names."""

    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    default: str | None = None
    """The domain of the sessions no group matched and no agent prefix claims; None makes
    each of them a domain of its own."""

    def domain(self, session: str) -> str:
        """The trust domain of ``session`` (its snapshots are shared within it only)."""
        agent = agent_of(session)
        for name, patterns in self.groups:
            for pattern in patterns:
                if fnmatchcase(session, pattern) or (
                    agent is not None and fnmatchcase(agent, pattern)
                ):
                    return f"group:{name}"
        if agent is not None:
            return f"agent:{agent}"
        return self.default if self.default is not None else f"session:{session}"

    def salt(self, session: str) -> bytes:
        """What mixes the domain of ``session`` into content addresses."""
        return self.domain(session).encode()


LOCAL_USER = "user:local"
"""The one domain of the embedded server's single client user (see the module docstring)."""

ISOLATED = ShareGroups()
"""No declared groups: every agent (or ungrouped session) is its own domain."""


def parse_share_groups(text: str, default: str | None = None) -> ShareGroups:
    """``NAME=PATTERN[,PATTERN][;NAME=PATTERN...]``; ``ShareGroupsError`` when malformed."""
    groups: list[tuple[str, tuple[str, ...]]] = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, sep, rest = part.partition("=")
        name = name.strip()
        patterns = tuple(p.strip() for p in rest.split(",") if p.strip())
        if not sep or not GROUP_NAME_RE.fullmatch(name) or not patterns:
            raise ShareGroupsError(
                f"bank share group {part[:64]!r} is not NAME=PATTERN[,PATTERN]: write a name "
                "of 1-32 letters, digits or '-', then '=', then session ids or agent names "
                "(globs such as ring-* allowed), groups separated by ';'"
            )
        bad = [p for p in patterns if not _PATTERN_RE.fullmatch(p)]
        if bad:
            raise ShareGroupsError(
                f"bank share group {name!r}: pattern {bad[0][:64]!r} is not a session id or "
                "agent name (letters, digits, '_', '-', and the globs * ? [ ])"
            )
        if any(name == known for known, _ in groups):
            raise ShareGroupsError(f"bank share group {name!r} is declared twice; merge them")
        groups.append((name, patterns))
    return ShareGroups(tuple(groups), default)
