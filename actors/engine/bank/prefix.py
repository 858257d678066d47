"""A content-addressed index of banked snapshots by the token blocks they begin with.

Any session whose prompt starts with a banked prefix can restore that snapshot: the index
maps each link of a snapshot's block hash chain (``tokens.block_chain``) to the snapshots
holding it, so a lookup walks the prompt's chain from its longest link down and stops at the
first one some snapshot holds. A hash only nominates candidates: the caller compares the
exact tokens (and the model) before anything is restored.

Every chain starts from the snapshot's trust domain (``domains``): a prompt's chain, salted
with its own session's domain, never meets a link another domain banked.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from actors.engine.bank.domains import ISOLATED, ShareGroups
from actors.engine.bank.meta import SnapshotMeta
from actors.engine.tokens import block_chain

Key = tuple[str, str]
"""(session, token hash): one snapshot."""


class PrefixIndex:
    """Block-chain links → the snapshots whose tokens begin with that prefix."""

    def __init__(self, groups: ShareGroups = ISOLATED) -> None:
        self.groups = groups
        """Which sessions share: the domain of a snapshot's session salts its chain."""
        self._by_link: dict[bytes, dict[Key, SnapshotMeta]] = {}
        self._links: dict[Key, list[bytes]] = {}
        self._lock = threading.Lock()

    def add(self, meta: SnapshotMeta) -> None:
        """Index ``meta`` under every whole block of its tokens, in its session's domain."""
        key = (meta.session, meta.token_hash)
        links = block_chain(meta.tokens, salt=self.groups.salt(meta.session))
        with self._lock:
            self._links[key] = links
            for link in links:
                self._by_link.setdefault(link, {})[key] = meta

    def remove(self, meta: SnapshotMeta) -> None:
        """Forget ``meta`` (absent is fine)."""
        key = (meta.session, meta.token_hash)
        with self._lock:
            for link in self._links.pop(key, ()):
                holders = self._by_link.get(link)
                if holders is not None:
                    holders.pop(key, None)
                    if not holders:
                        del self._by_link[link]

    def longest(
        self, chain: Sequence[bytes], accept: Callable[[SnapshotMeta], bool]
    ) -> list[SnapshotMeta]:
        """Accepted snapshots sharing the most whole blocks with the prompt of ``chain``
        (a chain salted with the asking session's domain: ``chain_of``)."""
        with self._lock:
            for link in reversed(chain):
                found = [m for m in self._by_link.get(link, {}).values() if accept(m)]
                if found:
                    return found
        return []

    def chain_of(self, session: str, tokens: Sequence[int]) -> list[bytes]:
        """The chain a prompt of ``session`` looks up: salted with that session's domain."""
        return block_chain(tokens, salt=self.groups.salt(session))
