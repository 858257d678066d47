"""JetStream assets kept at the configured number of replicas, refusals said in a sentence.

Every stream, KV bucket and object store the node makes is created with ``--replicas``
copies on as many servers of a NATS cluster. An asset that already exists with another
count is updated to it: JetStream moves a clustered stream between counts in place (a new
copy catches up from the others). Where the servers cannot place that many copies — a single
server asked for more than one, a cluster with fewer servers up than copies — JetStream's
refusal becomes a ``ReplicasError`` naming the asset and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

import structlog
from nats.js import JetStreamContext
from nats.js.errors import APIError

log = structlog.get_logger("replicas")

MAX_REPLICAS = 5
"""JetStream keeps at most five copies of a stream."""
NOT_CLUSTERED = 10074
"""JetStream's code for "replicas > 1 not supported in non-clustered mode"."""
PLACEMENT_REFUSED = frozenset({10005, 10023, NOT_CLUSTERED})
"""JetStream's codes for a placement it cannot make: no suitable peers (10005), insufficient
resources (10023), one server without a cluster (10074)."""


class ReplicasError(RuntimeError):
    """The NATS servers cannot keep the configured number of copies of an asset."""

    def __init__(self, what: str, replicas: int, err_code: int | None, answer: str) -> None:
        self.what = what
        self.replicas = replicas
        self.err_code = err_code
        if err_code == NOT_CLUSTERED:
            fix = (
                "this NATS is one server, not a JetStream cluster; pass --replicas 1, or "
                f"join a cluster of at least {replicas} servers"
            )
        else:
            fix = (
                f"the cluster needs {replicas} servers with JetStream up (and storage to "
                "spare) to place them; start the missing servers, or pass --replicas with "
                "at most the number of servers up"
            )
        super().__init__(
            f"the NATS servers cannot keep {replicas} replicas of {what} (JetStream "
            f"answered: {answer}, code {err_code}): {fix}"
        )


@contextlib.asynccontextmanager
async def placing(what: str, replicas: int) -> AsyncIterator[None]:
    """Turn JetStream's refusal to place ``replicas`` copies of ``what`` into ReplicasError."""
    try:
        yield
    except APIError as e:
        if e.err_code not in PLACEMENT_REFUSED:
            raise
        raise ReplicasError(what, replicas, e.err_code, e.description or str(e)) from e


async def keep_replicas(js: JetStreamContext, stream: str, what: str, replicas: int) -> None:
    """Update the existing ``stream`` (behind ``what``) to ``replicas`` copies if it has
    another count; its other settings stay as they are."""
    info = await js.stream_info(stream)
    have = info.config.num_replicas or 1
    if have == replicas:
        return
    async with placing(what, replicas):
        await js.update_stream(dataclasses.replace(info.config, num_replicas=replicas))
    changed(what, stream, have, replicas)


def changed(what: str, stream: str, was: int, now: int) -> None:
    """Log that ``stream`` (behind ``what``) went from ``was`` to ``now`` copies."""
    # A warning: a node started without the cluster's --replicas changes every asset to its
    # own count, which the operator should hear about.
    log.warning("replicas_changed", asset=what, stream=stream, was=was, now=now,
                hint="every node of a cluster should run with the same --replicas")


__all__ = ["MAX_REPLICAS", "ReplicasError", "changed", "keep_replicas", "placing"]
