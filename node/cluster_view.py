"""Every node's health, sessions and metrics, gathered by a client from one NATS.

The node-wide admin verbs (``<prefix>.admin.health``, ``sessions``, ``metrics``) are
answered by every node, each in a queue group of its own. The client publishes one request
with its own inbox and gathers the replies until every live node answered, or until the
deadline. Each reply names the live nodes as its node knows them (their membership keys in
the lease bucket), so the client needs no access to the bucket: it waits for every node any
reply named. A reply that names none (a node from before membership) leaves only the
deadline, ``GATHER_S`` at most.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from nats.aio.msg import Msg
from nats.errors import NoRespondersError

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

R = TypeVar("R", HealthReply, SessionsReply, MetricsReply)

GATHER_S = 1.0
"""How long replies are gathered when no reply said which nodes are live."""


@dataclass
class Gathered(Generic[R]):
    """The replies of one node-wide verb, and the live nodes they named."""

    replies: list[R] = field(default_factory=list)
    live: set[str] = field(default_factory=set)
    """Every node a reply named live, and every node that answered."""

    def answered(self) -> set[str]:
        """The nodes that answered."""
        return {r.node for r in self.replies}

    def missing(self) -> tuple[str, ...]:
        """Live nodes that did not answer."""
        return tuple(sorted(self.live - self.answered()))


async def gather(
    client: InfernodeClient, verb: AdminVerb, model: type[R], timeout: float,
    only: str | None = None,
) -> Gathered[R]:
    """Every node's reply to ``verb`` (with ``only``, that node's: the gathering ends when
    it answered); raises when none answered."""
    out: Gathered[R] = Gathered()
    errors: list[InferError] = []
    done = asyncio.Event()
    nobody = {"no_responders": False}

    def complete() -> bool:
        if only is not None:
            return only in out.answered()
        return bool(out.replies) and out.live <= out.answered()

    async def on_reply(msg: Msg) -> None:
        if not msg.data and (msg.headers or {}).get("Status") == "503":
            nobody["no_responders"] = True
            done.set()
            return
        try:
            reply: R = read_reply(msg, model)
        except InferError as e:
            errors.append(e)
            return
        if only is None or reply.node == only:
            out.replies.append(reply)
            out.live |= {reply.node, *reply.members}
        if complete():
            done.set()

    inbox = client.nc.new_inbox()
    sub = await client.nc.subscribe(inbox, cb=on_reply)
    try:
        await client.nc.publish(client.subjects.admin(verb), b"{}", reply=inbox)
        with contextlib.suppress(TimeoutError):  # the deadline: what came is the answer
            await asyncio.wait_for(done.wait(), timeout)
            if not nobody["no_responders"] and only is None and not any(
                r.members for r in out.replies
            ):
                done.clear()  # no reply named the live nodes: gather a little longer
                await asyncio.wait_for(done.wait(), min(timeout, GATHER_S))
    finally:
        await sub.unsubscribe()
    if not out.replies:
        if errors:
            raise errors[0]
        if nobody["no_responders"]:
            raise NoRespondersError
        raise TimeoutError(f"no node answered {client.subjects.admin(verb)} in {timeout:g} s")
    out.replies.sort(key=lambda r: r.node)
    if only is not None:
        out.live = {only}
    return out


async def cluster_health(
    client: InfernodeClient, timeout: float, only: str | None = None
) -> ClusterHealth:
    """Every node's health (or only that of node ``only``), and which node holds which
    partitions."""
    got = await gather(client, AdminVerb.HEALTH, HealthReply, timeout, only)
    return ClusterHealth(
        live=tuple(sorted(got.live)), owners={r.node: r.partitions for r in got.replies},
        nodes=tuple(got.replies), missing=got.missing(),
    )


async def cluster_sessions(
    client: InfernodeClient, timeout: float
) -> tuple[SessionsReply, tuple[str, ...]]:
    """Every node's sessions (each names its node), and the live nodes that did not answer."""
    got = await gather(client, AdminVerb.SESSIONS, SessionsReply, timeout)
    merged = sorted((s for r in got.replies for s in r.sessions), key=lambda s: (s.node, s.session))
    return SessionsReply(sessions=tuple(merged)), got.missing()


async def cluster_metrics(client: InfernodeClient, timeout: float) -> ClusterMetrics:
    """Every node's metric families."""
    got = await gather(client, AdminVerb.METRICS, MetricsReply, timeout)
    return ClusterMetrics(nodes=tuple(got.replies), missing=got.missing())
