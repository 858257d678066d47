"""The bank committer: the per-turn scheduler that banks every committed turn, after ``done``.

It owns no bank. The bank (``actors/engine/bank/``) belongs to the engine, which builds the
store, opens its durable tier and does all snapshotting and restoring; this actor only
decides when a committed turn's state is banked, asks the engine over the bus, and counts
what happened. It never delays a turn's stream: the runner hands it the commit after
publishing ``done`` and moves on. For each commit it asks the engine to snapshot the slot
once the slot is idle (bounded by ``wait_s``); on a deadline or an error it logs why and
drops only that snapshot, never the record (records live in the session's log, which it
never touches).

Commits are handled concurrently: one commit waiting for a busy slot must not hold back the
commits of other sessions. A later turn of the same session simply supersedes an earlier
snapshot that has not been taken yet.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import Histogram

from actors.base import Actor, encode, parse_reply
from schemas.internal import BankCommitRequest, SnapshotReply, SnapshotRequest
from schemas.subjects import Subjects

_REPLY_MARGIN_S = 5.0
"""Extra time for the engine's reply on top of its own bounded wait."""
COMMIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds: a small snapshot of an idle slot up to the default 30 s wait for a busy one."""


class BankCommitter(Actor):
    """Turns commit notices into snapshots in the bank."""

    name = "bank_committer"

    def __init__(self, nc: Client, subjects: Subjects, wait_s: float) -> None:
        super().__init__(nc, subjects)
        self.wait_s = wait_s
        self.committed = 0
        self.stored = 0
        self.handled = 0
        self.dropped: Counter[str] = Counter()
        self.bytes_stored = 0
        # Unregistered: the node's metrics collector yields it (one per node, no globals).
        self.commit_seconds = Histogram(
            "infernode_bank_commit_seconds",
            "Time from a turn's commit notice to its KV snapshot stored or dropped.",
            buckets=COMMIT_BUCKETS, registry=None,
        )
        self._progress = asyncio.Condition()

    async def start(self) -> None:
        """Subscribe to commit notices."""
        await self.subscribe(self.subjects.bank_commit(), self.on_commit, queue="bank")

    async def on_commit(self, msg: Msg) -> None:
        """Start banking one committed turn; the mailbox moves on at once."""
        req = BankCommitRequest.model_validate_json(msg.data)
        self.committed += 1
        self.spawn(self._bank(req), f"commit:{req.session}:{req.generation}")

    async def _bank(self, req: BankCommitRequest) -> None:
        snap = SnapshotRequest(
            session=req.session, generation=req.generation, token_hash=req.token_hash,
            wait_s=self.wait_s,
        )
        started = time.perf_counter()
        try:
            reply = await self.nc.request(
                self.subjects.engine_snapshot(), encode(snap),
                timeout=self.wait_s + _REPLY_MARGIN_S,
            )
            out: SnapshotReply = parse_reply(reply.data, reply.headers, SnapshotReply)
        except Exception as e:  # the engine failed or never answered: drop the snapshot
            out = SnapshotReply(stored=False, reason=f"error: {e!r}")
        self.commit_seconds.observe(time.perf_counter() - started)
        try:
            self._account(req, out)
        finally:
            async with self._progress:
                self.handled += 1
                self._progress.notify_all()

    def _account(self, req: BankCommitRequest, out: SnapshotReply) -> None:
        if out.stored:
            self.stored += 1
            self.bytes_stored += out.nbytes
            self.log.info(
                "bank_commit", session=req.session, generation=req.generation,
                tokens=out.n_tokens, nbytes=out.nbytes, snapshot_ms=round(out.ms, 2),
                note=out.reason,
            )
            return
        reason = out.reason or "unknown"
        self.dropped[reason.split(":")[0]] += 1
        self.log.warning(
            "bank_commit_dropped", session=req.session, generation=req.generation,
            tokens=req.n_tokens, reason=reason,
        )

    async def wait_handled(self, count: int, timeout: float = 30.0) -> None:
        """Return once ``count`` commits were handled (stored or dropped); for tests and drains."""
        async with self._progress:
            await asyncio.wait_for(
                self._progress.wait_for(lambda: self.handled >= count), timeout
            )

    def stats(self) -> dict[str, int]:
        """Counters for admin and metrics."""
        return {
            "committed": self.committed,
            "stored": self.stored,
            "handled": self.handled,
            "bytes_stored": self.bytes_stored,
            **{f"dropped_{k}": v for k, v in self.dropped.items()},
        }
