"""Reading the lease bucket: which nodes are live, and which node holds each partition.

Both read every current key once through a watcher (deleted and expired keys are not sent),
so an admin view and a node's balance see the same membership. ``watch_leases`` follows
every lease write as it happens, so a node knows when each lease it does not hold runs out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from schemas.internal import PartitionLease
from schemas.subjects import MEMBER_KEY_PREFIX, Subjects


async def read_members(kv: KeyValue) -> frozenset[str]:
    """The ids of the live nodes: those whose membership keys have not run out."""
    found: set[str] = set()
    watcher = await kv.watch(f"{MEMBER_KEY_PREFIX}>", ignore_deletes=True, meta_only=True)
    try:
        async for entry in watcher:
            if entry is None:  # every current key was sent
                break
            found.add(entry.key[len(MEMBER_KEY_PREFIX):])
    finally:
        await watcher.stop()
    return frozenset(found)


async def read_owners(kv: KeyValue, subjects: Subjects) -> dict[int, str]:
    """Partition → the node holding its lease, for every lease held now."""
    lead = subjects.lease_key(0)[:-1]
    owners: dict[int, str] = {}
    watcher = await kv.watch(f"{lead}>", ignore_deletes=True)
    try:
        async for entry in watcher:
            if entry is None:
                break
            if entry.value:
                lease = PartitionLease.model_validate_json(entry.value)
                owners[lease.partition] = lease.node
    finally:
        await watcher.stop()
    return owners


async def watch_leases(
    kv: KeyValue, subjects: Subjects, seen: Callable[[int, str | None], None]
) -> None:
    """Tell ``seen(partition, node)`` of each lease as it is now, then of every write to one
    as it happens (``node`` None: the lease was given back); returns only if the watch ends."""
    lead = subjects.lease_key(0)[:-1]
    watcher = await kv.watch(f"{lead}>")
    try:
        async for entry in watcher:
            if entry is None:  # every current lease was sent; the writes follow
                continue
            partition = entry.key[len(lead):]
            if not partition.isdigit():
                continue
            if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                seen(int(partition), None)
                continue
            with contextlib.suppress(ValidationError):  # not a lease: nothing to learn
                seen(int(partition), PartitionLease.model_validate_json(entry.value).node)
    finally:
        with contextlib.suppress(Exception):  # a closed connection has nothing to stop
            await watcher.stop()


__all__ = ["read_members", "read_owners", "watch_leases"]
