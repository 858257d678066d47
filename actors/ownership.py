"""What admission and the session runners know of partition ownership, and how they hear of
changes: the protocols ``actors.leases.PartitionLeases`` implements.

Sessions are spread over a fixed number of partitions (``schemas.subjects.partition_of``);
a node serves a session only while it holds the lease of the session's partition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from actors.balance import Heat


class PartitionUser(Protocol):
    """An actor that serves the partitions this node owns (admission, the runner host)."""

    async def gain(self, partitions: frozenset[int]) -> None:
        """Start serving ``partitions`` (their leases are held now)."""

    async def lose(self, partitions: frozenset[int]) -> None:
        """Stop serving ``partitions`` at once, recording nothing (another node may own
        them now)."""

    async def hand_over(self, partitions: frozenset[int]) -> None:
        """Stop serving ``partitions`` gracefully (their leases are still held): finish
        what is in hand, bank it durably, then forget them; their leases are given back
        once every user returned."""


class Ownership(Protocol):
    """This node's view of the partition leases."""

    node: str
    """This node's id (recorded on every record it appends)."""
    members: frozenset[str]
    """The live nodes (this one included) as this node last read their membership keys."""

    def join(self, user: PartitionUser) -> None:
        """Tell ``user`` of every later gain and loss (gains in joining order, losses and
        hand-overs in the reverse order)."""

    def rank_by(self, heat: Callable[[int], Heat]) -> None:
        """Measure how hot each held partition is with ``heat`` when choosing which ones to
        hand over to a node that joined (the coldest go)."""

    def held(self) -> frozenset[int]:
        """The partitions whose leases this node holds now."""

    def partition(self, session: str) -> int:
        """The partition of ``session``."""

    def owns(self, session: str) -> bool:
        """True while this node holds the lease of ``session``'s partition."""

    def valid(self, session: str) -> bool:
        """True while the lease is held and, by this node's clock, not yet expired: a node
        that was paused past its lease writes nothing before it learns it lost it."""

    def fenced(self, session: str) -> None:
        """The record log refused an append: another node owns ``session``'s partition."""
