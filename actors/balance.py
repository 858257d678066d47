"""Fair shares of the partitions among the live nodes, and which partitions a node gives up.

Pure rules, so every node computes the same answer from the same membership:

- The live nodes (their membership keys in the lease bucket) are sorted by id; with ``N``
  partitions and ``M`` nodes each node's share is ``N // M``, and the first ``N % M`` nodes
  in that order take one more. The shares add up to exactly ``N``, so once every node holds
  its share no node is over and none under: nothing moves again until the membership does.
- A node over its share gives up the surplus, coldest partitions first: fewest sessions busy
  or waiting, then fewest sessions, then the longest since a prompt arrived, then the
  highest partition number. The sessions it keeps are those whose KV state is hot in its
  slots; those it hands over are banked first and restored by the taker.
- A node takes free partitions only up to its share.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

Heat = tuple[float, ...]
"""How hot a partition is on this node; tuples compare coldest first."""

COLD: Heat = ()
"""The heat of a partition no user measured (it sorts before any measured one)."""


def fair_shares(members: Iterable[str], partitions: int) -> dict[str, int]:
    """Each live node's share of ``partitions``: ``N // M``, one more for the first
    ``N % M`` nodes by id."""
    order = sorted(set(members))
    if not order:
        return {}
    base, extra = divmod(partitions, len(order))
    return {node: base + (1 if i < extra else 0) for i, node in enumerate(order)}


def surplus(
    held: Collection[int], share: int, heat: Callable[[int], Heat]
) -> frozenset[int]:
    """The partitions to give up to come down to ``share``: the coldest, ties to the
    highest partition number."""
    excess = len(held) - share
    if excess <= 0:
        return frozenset()
    ranked = sorted(held, key=lambda p: (heat(p), -p))
    return frozenset(ranked[:excess])


__all__ = ["COLD", "Heat", "fair_shares", "surplus"]
