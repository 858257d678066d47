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

A node also watches every lease write, so it knows, by its own clock, when each lease
another node holds runs out unless renewed (``ttl`` after the write came by), and tries to
take it then rather than at its next renewal round (up to a third of a TTL later); a lease
given back is tried at once.

Nodes balance (``actors.balance``): each node also keeps a membership key in the bucket,
renewed with its leases, and takes free partitions only up to its fair share of the live
members. A node over its share (another node joined) waits until the membership has held
still for one TTL (a node that comes and goes moves nothing), then hands its coldest
surplus partitions over as a stopping node does: its users finish or abort the turns in
flight and bank each session durably, and only then is the lease given back, so the node
that takes it restores the sessions instead of recomputing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from actors.balance import COLD, Heat, fair_shares, surplus
from actors.base import Actor, encode
from actors.lease_bucket import read_members, watch_leases
from actors.ownership import PartitionUser
from actors.replicas import keep_replicas, placing
from schemas.internal import NodeMember, PartitionLease
from schemas.subjects import Subjects, partition_of

GAIN_RETRY_S = 0.25
GAIN_RETRY_MAX_S = 4.0
"""A gain a user failed to take is told again after 0.25 s, doubling up to 4 s."""
RENEWALS_PER_TTL = 3
"""Renewals per lease TTL: two can fail (a slow server) before the lease runs out."""
PROBE_RETRY_S = 0.05
PROBE_TRIES = 10
"""A lease due to run out is tried up to 10 times, 50 ms apart: the server frees an expired
key a little after its TTL (up to about 0.3 s was seen), not at the instant."""


@dataclass(frozen=True)
class Change:
    """Partitions gained, lost or to hand over, to tell the users who had joined when it
    happened."""

    kind: Literal["gain", "lose", "hand_over"]
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
        balance: bool,
    ) -> None:
        super().__init__(nc, subjects)
        self.node = node
        self.partitions = partitions
        self.ttl_s = ttl_s
        self.replicas = replicas
        self.balance = balance
        """Take only a fair share and hand the surplus over; off: take every free one."""
        self.leases: dict[int, Lease] = {}
        self.members: frozenset[str] = frozenset({node})
        """The live nodes, as this node last read their membership keys."""
        self._members_since = time.monotonic()
        self._since = time.time()
        self._leaving: set[int] = set()
        """Partitions being handed over: still held (and renewed) until their users let go."""
        self._heat: Callable[[int], Heat] = lambda partition: COLD
        self._users: list[PartitionUser] = []
        self._changes: asyncio.Queue[Change] = asyncio.Queue()
        """Gains and losses for the users, told in order by one task: a slow user (a big
        rebuild) never holds up the renewals."""
        self._stopping = asyncio.Event()
        self._runs_out: dict[int, tuple[float, int]] = {}
        """Leases another node holds (or gave back): when each runs out unless renewed
        (``time.monotonic()``), and how often taking it was tried since."""
        self._wake = asyncio.Event()
        """Set when the keeper should look again sooner (a lease runs out earlier, a stop)."""
        self._wake_at = math.inf
        self._keeper: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        self._kv: KeyValue | None = None

    # -- Ownership -------------------------------------------------------------------------
    def join(self, user: PartitionUser) -> None:
        """Tell ``user`` of later gains (in joining order), losses and hand-overs (in
        reverse)."""
        self._users.append(user)

    def rank_by(self, heat: Callable[[int], Heat]) -> None:
        """Choose the partitions to hand over by ``heat`` (coldest first)."""
        self._heat = heat

    def share(self) -> int:
        """How many partitions this node takes: its fair share of the live members."""
        if not self.balance:
            return self.partitions
        return fair_shares(self.members, self.partitions)[self.node]

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
        """Open the bucket, join the members and take free partitions up to this node's
        share (before the users start)."""
        self._kv = await self._bucket()
        await self._announce()
        await self._read_members()
        await self._take_free()
        self._keeper = self.spawn(self._keep(), "keep")
        # Not spawned: a stop cancels it (the watch has nothing to finish), maybe before
        # it ran at all.
        self._watching = asyncio.get_running_loop().create_task(self._watch())
        self.spawn(self._tell_users(), "tell")

    async def stop(self) -> None:
        """Stop renewing and give the leases back, so another node takes them at once."""
        self._stopping.set()
        self._wake.set()
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
        self._changes.put_nowait(Change("lose", frozenset(), ()))  # wakes the teller to stop
        await super().stop()
        held = sorted(self.leases)
        if held and not self.nc.is_connected:
            # No server to tell: waiting on each delete would only hold the stop up; the
            # leases run out by their TTL and another node takes them then.
            self.log.warning("leases_left_to_expire", partitions=held, ttl_s=self.ttl_s)
        elif held:
            await asyncio.gather(*(self._release(p, self.leases[p].revision) for p in held))
            self.log.info("leases_released", partitions=held)
        if self.nc.is_connected:  # the others' shares grow at once, not after the TTL
            try:
                await self.kv.delete(self.subjects.member_key(self.node))
            except Exception as e:  # it runs out by its TTL anyway
                self.log.warning("member_leave_failed", error=repr(e))
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
        period = self.ttl_s / RENEWALS_PER_TTL
        next_round = time.monotonic() + period
        while await self._sleep_until(min(next_round, self._probe_at())):
            if time.monotonic() < next_round:
                await self._probe()
                continue
            # The member key is renewed before the leases, so it runs out first: when a
            # dead node's leases are free, the others already count it out.
            for step in (self._announce, self._renew, self._read_members):
                if self._stopping.is_set():  # a stop does not wait out a round's timeouts
                    return
                await step()
            self._hand_over_surplus()
            await self._take_free()
            next_round = time.monotonic() + period

    async def _sleep_until(self, at: float) -> bool:
        """Wait until ``at``, or until a lease is seen to run out sooner; False once stopping."""
        self._wake.clear()
        self._wake_at = at
        if not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, at - time.monotonic()))
        return not self._stopping.is_set()

    async def _tell_users(self) -> None:
        while not (self._stopping.is_set() and self._changes.empty()):
            change = await self._changes.get()
            gained = change.kind == "gain"
            users = change.users if gained else tuple(reversed(change.users))
            for user in users:
                if gained:
                    await self._tell_gain(user, change.partitions)
                    continue
                verb = {"lose": user.lose, "hand_over": user.hand_over}
                await self._tell(verb[change.kind], change.partitions)
            if change.kind == "hand_over":
                await self._give_back(change.partitions)

    # -- membership and balance ------------------------------------------------------------
    async def _announce(self) -> None:
        """Write (or renew) this node's membership key."""
        value = encode(NodeMember(node=self.node, since=self._since))
        try:
            await self.kv.put(self.subjects.member_key(self.node), value)
        except Exception as e:  # NATS away: the others may count this node out meanwhile
            self.log.warning("member_renew_failed", error=repr(e))

    async def _read_members(self) -> None:
        """The live nodes (their membership keys); unchanged if the bucket cannot be read."""
        try:
            found = await read_members(self.kv)
        except Exception as e:
            self.log.warning("members_read_failed", error=repr(e))
            return
        members = frozenset(found | {self.node})
        if members != self.members:
            self.members, self._members_since = members, time.monotonic()
            self.log.info("members_changed", node=self.node, members=sorted(members),
                          share=self.share())

    def _hand_over_surplus(self) -> None:
        """Start handing over what is above this node's share, once the membership held
        still for one TTL and no hand-over is in progress (hysteresis: no flapping)."""
        if not self.balance or self._leaving or self._stopping.is_set():
            return
        if time.monotonic() - self._members_since < self.ttl_s:
            return
        give = surplus(self.held(), self.share(), self._heat)
        if give:
            self._leaving |= give
            self.log.info("leases_handing_over", node=self.node, partitions=sorted(give),
                          share=self.share(), members=sorted(self.members))
            self._changes.put_nowait(Change("hand_over", give, tuple(self._users)))

    async def _give_back(self, partitions: frozenset[int]) -> None:
        """The users let go of ``partitions``: give their leases back for another to take."""
        mine = sorted(p for p in partitions if p in self.leases)
        await asyncio.gather(*(self._release(p, self.leases[p].revision) for p in mine))
        for partition in mine:
            self.leases.pop(partition, None)
        self._leaving -= partitions
        self.log.info("leases_handed_over", node=self.node, partitions=mine)

    # -- the leases of others: when each runs out -------------------------------------------
    async def _watch(self) -> None:
        """Follow every lease write (started again after a failure; the renewal rounds take
        free leases meanwhile, only later)."""
        delay = GAIN_RETRY_S
        while not self._stopping.is_set():
            try:
                await watch_leases(self.kv, self.subjects, self._seen)
            except Exception as e:
                self.log.warning("lease_watch_failed", error=repr(e), retry_in_s=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(2 * delay, GAIN_RETRY_MAX_S)

    def _seen(self, partition: int, node: str | None) -> None:
        """A lease write came by: note when the lease runs out unless its holder renews it."""
        if node == self.node:
            self._runs_out.pop(partition, None)
            return
        at = time.monotonic() + (self.ttl_s if node is not None else 0.0)
        self._runs_out[partition] = (at, 0)
        if at < self._wake_at:
            self._wake.set()

    def _probe_at(self) -> float:
        """When the next lease of another node runs out (infinity: none is known)."""
        return min((at for at, _ in self._runs_out.values()), default=math.inf)

    async def _probe(self) -> None:
        """Try to take the leases that ran out by now; one still held is tried again
        shortly (the server frees a key a little after its TTL), ``PROBE_TRIES`` times."""
        now = time.monotonic()
        due = sorted(p for p, (at, _) in self._runs_out.items() if at <= now)
        if not due or self._stopping.is_set():
            return
        if self.balance:  # the dead node's member key ran out first: the shares grew
            await self._read_members()
        await self._take_free(due)
        for partition in due:
            at, tries = self._runs_out.get(partition, (math.inf, 0))
            if at > now:  # taken here, or written again meanwhile
                continue
            if partition in self.leases or tries + 1 >= PROBE_TRIES:
                self._runs_out.pop(partition, None)
            else:
                self._runs_out[partition] = (time.monotonic() + PROBE_RETRY_S, tries + 1)

    # -- taking, renewing, losing ----------------------------------------------------------
    def _value(self, partition: int) -> bytes:
        return encode(PartitionLease(node=self.node, partition=partition))

    async def _take_free(self, among: list[int] | None = None) -> None:
        """Take free partitions (of ``among`` only, when given) up to this node's share."""
        gained: set[int] = set()
        for partition in range(self.partitions) if among is None else among:
            if len(self.leases) >= self.share():
                break
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
            self._changes.put_nowait(Change("gain", frozenset(gained), tuple(self._users)))

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
        # All at once: one by one, a server that stopped answering holds a round for a
        # timeout per lease (16 x 5 s), past the TTL of the leases still waiting their turn.
        held = list(self.leases.items())
        lost = await asyncio.gather(*(self._renew_one(p, lease) for p, lease in held))
        self._lose(frozenset(p for p in lost if p is not None) & self.held(), "expired")

    async def _renew_one(self, partition: int, lease: Lease) -> int | None:
        """Renew one lease; the partition if it is lost."""
        sent = time.monotonic()
        try:
            revision = await self.kv.update(
                self.subjects.lease_key(partition), self._value(partition),
                last=lease.revision,
            )
        except KeyWrongLastSequenceError:  # expired, and maybe another node's now
            return partition
        except Exception as e:  # NATS away: the lease runs out by this node's clock
            self.log.warning("lease_renew_failed", partition=partition, error=repr(e))
            return partition if sent > lease.renewed_at + self.ttl_s else None
        if self.leases.get(partition) == lease:  # not given up meanwhile (fenced)
            self.leases[partition] = Lease(revision, sent)
        return None

    def _lose(self, partitions: frozenset[int], why: str) -> None:
        if not partitions:
            return
        for partition in partitions:
            del self.leases[partition]
        self._leaving -= partitions
        self.log.warning("leases_lost", node=self.node, partitions=sorted(partitions), why=why)
        self._changes.put_nowait(Change("lose", partitions, tuple(self._users)))

    async def _tell_gain(self, user: PartitionUser, partitions: frozenset[int]) -> None:
        """Tell ``user`` of a gain until it took it, while the partitions are still held.

        A gain that fails (the server leading a stream died and its successor is not
        elected yet) would otherwise leave the partitions held and unserved: their prompts
        wait in the intake until the lease moves, which it never does while this node renews
        it. Users' gains skip what they already serve, so a retry does only the rest; the
        next user hears of the gain only once this one took it (the runner host rebuilds the
        sessions before admission pulls their prompts).
        """
        delay = GAIN_RETRY_S
        while still := partitions & self.held():
            if self._stopping.is_set():
                return
            try:
                await user.gain(still)
                return
            except Exception as e:  # told again shortly; the lease is still renewed meanwhile
                self.errors += 1
                self.log.warning("partition_gain_failed", partitions=sorted(still),
                                 user=type(user).__name__, error=repr(e), retry_in_s=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(2 * delay, GAIN_RETRY_MAX_S)

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
