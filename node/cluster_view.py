"""Every node's health, sessions and metrics, gathered by a client from one NATS.

The node-wide admin verbs (``<prefix>.admin.health``, ``sessions``, ``metrics``) are
answered by every node, each in a queue group of its own. The client publishes one request
with its own inbox and gathers the replies until as many nodes answered as have a live
membership key in the lease bucket, or until the deadline. When the bucket cannot be read
(an older node, or a user not allowed to read it) it gathers for ``GATHER_S`` at most.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from pydantic import BaseModel

from actors.leases import read_members, read_owners
from node.client import InfernodeClient, read_reply
from schemas.admin import (
    ClusterHealth,
    ClusterMetrics,
    HealthReply,
    MetricsReply,
    SessionsReply,
)
from schemas.errors import InferError
from schemas.subjects import AdminVerb

M = TypeVar("M", bound=BaseModel)

GATHER_S = 1.0
"""How long replies are gathered when the number of live nodes is not known."""
BUCKET_READ_S = 2.0
"""Longest wait for the lease bucket's membership and leases."""


@dataclass
class Gathered(Generic[M]):
    """The replies of one node-wide verb, and what the lease bucket says of the nodes."""

    replies: list[M] = field(default_factory=list)
    live: frozenset[str] | None = None
    """The nodes with a live membership key (None: the bucket could not be read)."""
    owners: dict[int, str] = field(default_factory=dict)
    """Partition → the node holding its lease."""

    def missing(self, answered: set[str]) -> tuple[str, ...]:
        """Live nodes that did not answer."""
        return tuple(sorted((self.live or frozenset()) - answered))


async def _bucket(client: InfernodeClient) -> tuple[frozenset[str] | None, dict[int, str]]:
    async def read() -> tuple[frozenset[str], dict[int, str]]:
        kv = await client.nc.jetstream().key_value(client.subjects.lease_bucket)
        return await read_members(kv), await read_owners(kv, client.subjects)

    try:
        return await asyncio.wait_for(read(), BUCKET_READ_S)
    except Exception:  # no bucket (one node that never made it) or not allowed: no count
        return None, {}


async def gather(
    client: InfernodeClient, verb: AdminVerb, model: type[M], timeout: float,
    only: str | None = None,
) -> Gathered[M]:
    """Every node's reply to ``verb`` (with ``only``, that node's: the gathering ends when
    it answered); raises when none answered."""
    out: Gathered[M] = Gathered()
    out.live, out.owners = await _bucket(client)
    if only is not None:
        out.live = frozenset({only})
    errors: list[InferError] = []
    done = asyncio.Event()
    nobody = {"no_responders": False}

    async def on_reply(msg: Msg) -> None:
        if not msg.data and (msg.headers or {}).get("Status") == "503":
            nobody["no_responders"] = True
            done.set()
            return
        try:
            reply = read_reply(msg, model)
        except InferError as e:
            errors.append(e)
        else:
            if only is None or getattr(reply, "node", None) == only:
                out.replies.append(reply)
        if out.live and len(out.replies) + len(errors) >= len(out.live):
            done.set()

    inbox = client.nc.new_inbox()
    sub = await client.nc.subscribe(inbox, cb=on_reply)
    try:
        await client.nc.publish(client.subjects.admin(verb), b"{}", reply=inbox)
        with contextlib.suppress(TimeoutError):  # the deadline: what came is the answer
            await asyncio.wait_for(done.wait(), timeout if out.live else min(timeout, GATHER_S))
    finally:
        await sub.unsubscribe()
    if not out.replies:
        if errors:
            raise errors[0]
        if nobody["no_responders"]:
            raise NoRespondersError
        raise TimeoutError(f"no node answered {client.subjects.admin(verb)} in {timeout:g} s")
    out.replies.sort(key=lambda r: str(getattr(r, "node", "")))
    return out


async def cluster_health(
    client: InfernodeClient, timeout: float, only: str | None = None
) -> ClusterHealth:
    """Every node's health (or only that of node ``only``), and which node holds which
    partitions."""
    got = await gather(client, AdminVerb.HEALTH, HealthReply, timeout, only)
    owners: dict[str, list[int]] = {}
    for partition, node in sorted(got.owners.items()):
        if only is None or node == only:
            owners.setdefault(node, []).append(partition)
    return ClusterHealth(
        live=tuple(sorted(got.live or ())), owners={n: tuple(p) for n, p in owners.items()},
        nodes=tuple(got.replies), missing=got.missing({r.node for r in got.replies}),
    )


async def cluster_sessions(
    client: InfernodeClient, timeout: float
) -> tuple[SessionsReply, tuple[str, ...]]:
    """Every node's sessions (each names its node), and the live nodes that did not answer."""
    got = await gather(client, AdminVerb.SESSIONS, SessionsReply, timeout)
    merged = sorted((s for r in got.replies for s in r.sessions), key=lambda s: (s.node, s.session))
    return SessionsReply(sessions=tuple(merged)), got.missing({r.node for r in got.replies})


async def cluster_metrics(client: InfernodeClient, timeout: float) -> ClusterMetrics:
    """Every node's metric families."""
    got = await gather(client, AdminVerb.METRICS, MetricsReply, timeout)
    return ClusterMetrics(
        nodes=tuple(got.replies), missing=got.missing({r.node for r in got.replies})
    )
