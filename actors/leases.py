"""Partition leases in a JetStream KV bucket: taken, renewed, lost and given back.

A lease is one key per partition whose value names its owner; the bucket's TTL ends a lease
its owner stops renewing (a killed or paused node). Taking is ``create`` (only when the key
is absent, or when it already names this node: a restarted node takes its own back at
once); renewing is ``update`` against the revision this node wrote last, so a node that
lost its lease learns it at its next renewal. Each write's revision is the lease's fencing
token. On one node, the node takes every partition at start and the rest is bookkeeping.

A lease counts as valid by this node's clock only until ``ttl`` after the renewal that set
it was *sent*: the server's clock started later, so this node stops writing before the
server can hand the partition to another node (a paused process resumes unable to write).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from actors.base import Actor, encode
from actors.ownership import PartitionUser
from actors.replicas import keep_replicas, placing
from schemas.internal import PartitionLease
from schemas.subjects import Subjects, partition_of

RENEWALS_PER_TTL = 3
"""Renewals per lease TTL: two can fail (a slow server) before the lease runs out."""


@dataclass(frozen=True)
class Change:
    """Partitions gained or lost, to tell the users who had joined when it happened."""

    gained: bool
    partitions: frozenset[int]
    users: tuple[PartitionUser, ...]


@dataclass(frozen=True)
class Lease:
    """One partition's lease as this node holds it."""

    revision: int
    """The key's revision this node wrote last (the fencing token)."""
    renewed_at: float
    """``time.monotonic()`` when the write that set ``revision`` was sent."""


class PartitionLeases(Actor):
    """Takes free partitions, renews the held ones, tells admission and the runners."""

    name = "leases"

    def __init__(
        self, nc: Client, subjects: Subjects, node: str, partitions: int, ttl_s: float,
        replicas: int,
    ) -> None:
        super().__init__(nc, subjects)
        self.node = node
        self.partitions = partitions
        self.ttl_s = ttl_s
        self.replicas = replicas
        self.leases: dict[int, Lease] = {}
        self._users: list[PartitionUser] = []
        self._changes: asyncio.Queue[Change] = asyncio.Queue()
        """Gains and losses for the users, told in order by one task: a slow user (a big
        rebuild) never holds up the renewals."""
        self._stopping = asyncio.Event()
        self._kv: KeyValue | None = None

    # -- Ownership -------------------------------------------------------------------------
    def join(self, user: PartitionUser) -> None:
        """Tell ``user`` of later gains (in joining order) and losses (in reverse)."""
        self._users.append(user)

    def held(self) -> frozenset[int]:
        """The partitions whose leases this node holds now."""
        return frozenset(self.leases)

    def partition(self, session: str) -> int:
        """The partition of ``session``."""
        return partition_of(session, self.partitions)

    def owns(self, session: str) -> bool:
        """True while this node holds the lease of ``session``'s partition."""
        return self.partition(session) in self.leases

    def valid(self, session: str) -> bool:
        """True while the lease is held and not yet expired by this node's clock."""
        lease = self.leases.get(self.partition(session))
        return lease is not None and time.monotonic() < lease.renewed_at + self.ttl_s

    def fenced(self, session: str) -> None:
        """The record log refused an append: give up the session's partition."""
        self._lose(frozenset({self.partition(session)}) & self.held(), "fenced")

    # -- life ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the bucket and take every free partition (before the users start)."""
        self._kv = await self._bucket()
        await self._take_free()
        self.spawn(self._keep(), "keep")
        self.spawn(self._tell_users(), "tell")

    async def stop(self) -> None:
        """Stop renewing and give the leases back, so another node takes them at once."""
        self._stopping.set()
        self._changes.put_nowait(Change(False, frozenset(), ()))  # wakes the teller to stop
        await super().stop()
        held = sorted(self.leases)
        if held and not self.nc.is_connected:
            # No server to tell: waiting on each delete would only hold the stop up; the
            # leases run out by their TTL and another node takes them then.
            self.log.warning("leases_left_to_expire", partitions=held, ttl_s=self.ttl_s)
        elif held:
            await asyncio.gather(*(self._release(p, self.leases[p].revision) for p in held))
            self.log.info("leases_released", partitions=held)
        self.leases.clear()

    async def _release(self, partition: int, revision: int) -> None:
        try:
            await self.kv.delete(self.subjects.lease_key(partition), last=revision)
        except Exception as e:  # it runs out by its TTL anyway
            self.log.warning("lease_release_failed", partition=partition, error=repr(e))

    @property
    def kv(self) -> KeyValue:
        """The lease bucket (open once started)."""
        assert self._kv is not None, "start() opens the lease bucket"
        return self._kv

    async def _bucket(self) -> KeyValue:
        js = self.nc.jetstream()
        bucket = self.subjects.lease_bucket
        what = f"the KV bucket {bucket}"
        try:
            kv = await js.key_value(bucket)
        except BucketNotFoundError:
            async with placing(what, self.replicas):
                return await js.create_key_value(KeyValueConfig(
                    bucket=bucket, history=1, ttl=self.ttl_s, storage=StorageType.FILE,
                    replicas=self.replicas,
                ))
        await keep_replicas(js, self.subjects.kv_stream(bucket), what, self.replicas)
        return kv

    async def _keep(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), self.ttl_s / RENEWALS_PER_TTL)
                return
            except TimeoutError:
                pass
            await self._renew()
            await self._take_free()

    async def _tell_users(self) -> None:
        while not (self._stopping.is_set() and self._changes.empty()):
            change = await self._changes.get()
            users = change.users if change.gained else tuple(reversed(change.users))
            for user in users:
                await self._tell(user.gain if change.gained else user.lose, change.partitions)

    # -- taking, renewing, losing ----------------------------------------------------------
    def _value(self, partition: int) -> bytes:
        return encode(PartitionLease(node=self.node, partition=partition))

    async def _take_free(self) -> None:
        gained: set[int] = set()
        for partition in range(self.partitions):
            if partition in self.leases or self._stopping.is_set():
                continue
            sent = time.monotonic()
            key = self.subjects.lease_key(partition)
            revision: int | None
            try:
                revision = await self.kv.create(key, self._value(partition))
            except KeyWrongLastSequenceError:  # held: by this node before a restart?
                revision = await self._reclaim(partition)
            except Exception as e:  # NATS away: try again at the next renewal
                self.log.warning("lease_take_failed", partition=partition, error=repr(e))
                continue
            if revision is not None:
                self.leases[partition] = Lease(revision, sent)
                gained.add(partition)
        if gained:
            self.log.info("leases_gained", node=self.node, partitions=sorted(gained))
            self._changes.put_nowait(Change(True, frozenset(gained), tuple(self._users)))

    async def _reclaim(self, partition: int) -> int | None:
        """Take back a lease that names this node (it restarted); None if another's."""
        key = self.subjects.lease_key(partition)
        try:
            entry = await self.kv.get(key)
            if entry.value is None:
                return None
            if PartitionLease.model_validate_json(entry.value).node != self.node:
                return None
            return await self.kv.update(key, self._value(partition), last=entry.revision)
        except (KeyNotFoundError, KeyWrongLastSequenceError):  # expired or taken meanwhile
            return None

    async def _renew(self) -> None:
        lost: set[int] = set()
        for partition, lease in list(self.leases.items()):
            sent = time.monotonic()
            try:
                revision = await self.kv.update(
                    self.subjects.lease_key(partition), self._value(partition),
                    last=lease.revision,
                )
            except KeyWrongLastSequenceError:  # expired, and maybe another node's now
                lost.add(partition)
                continue
            except Exception as e:  # NATS away: the lease runs out by this node's clock
                self.log.warning("lease_renew_failed", partition=partition, error=repr(e))
                if sent > lease.renewed_at + self.ttl_s:
                    lost.add(partition)
                continue
            if self.leases.get(partition) == lease:  # not given up meanwhile (fenced)
                self.leases[partition] = Lease(revision, sent)
        self._lose(frozenset(lost) & self.held(), "expired")

    def _lose(self, partitions: frozenset[int], why: str) -> None:
        if not partitions:
            return
        for partition in partitions:
            del self.leases[partition]
        self.log.warning("leases_lost", node=self.node, partitions=sorted(partitions), why=why)
        self._changes.put_nowait(Change(False, partitions, tuple(self._users)))

    async def _tell(
        self, verb: Callable[[frozenset[int]], Awaitable[None]], partitions: frozenset[int]
    ) -> None:
        try:
            await verb(partitions)
        except Exception as e:  # one user's failure must not stop the others hearing it
            self.errors += 1
            self.log.exception("partition_change_failed", partitions=sorted(partitions),
                               error=str(e))


__all__ = ["PartitionLeases"]
