"""The bank committer: banks the KV state of every committed turn, after ``done``.

It never delays a turn's stream: the runner hands it the commit after publishing ``done``
and moves on. It asks the engine to snapshot the slot once the slot is idle (bounded wait);
on a deadline or an error it logs why and drops only that snapshot, never the record.
"""

from __future__ import annotations

from collections import Counter

from nats.aio.client import Client
from nats.aio.msg import Msg

from actors.base import Actor, encode, parse_reply
from schemas.internal import BankCommitRequest, SnapshotReply, SnapshotRequest
from schemas.subjects import Subjects


class BankCommitter(Actor):
    """Turns commit notices into snapshots in the bank."""

    name = "bank_committer"

    def __init__(self, nc: Client, subjects: Subjects, wait_s: float = 30.0) -> None:
        super().__init__(nc, subjects)
        self.wait_s = wait_s
        self.committed = 0
        self.stored = 0
        self.dropped: Counter[str] = Counter()
        self.bytes_stored = 0

    async def start(self) -> None:
        """Subscribe to commit notices (one at a time: the mailbox)."""
        await self.subscribe(self.subjects.bank_commit(), self.on_commit, queue="bank")

    async def on_commit(self, msg: Msg) -> None:
        """Bank one committed turn."""
        req = BankCommitRequest.model_validate_json(msg.data)
        self.committed += 1
        snap = SnapshotRequest(
            session=req.session, generation=req.generation, token_hash=req.token_hash,
            wait_s=self.wait_s,
        )
        try:
            reply = await self.nc.request(
                self.subjects.engine_snapshot(), encode(snap), timeout=self.wait_s + 5
            )
            out: SnapshotReply = parse_reply(reply.data, reply.headers, SnapshotReply)
        except Exception as e:
            out = SnapshotReply(stored=False, reason=f"error: {e!r}")
        if out.stored:
            self.stored += 1
            self.bytes_stored += out.nbytes
            self.log.info(
                "bank_commit", session=req.session, generation=req.generation,
                tokens=out.n_tokens, nbytes=out.nbytes, snapshot_ms=round(out.ms, 2),
                note=out.reason,
            )
        else:
            reason = out.reason or "unknown"
            self.dropped[reason.split(":")[0]] += 1
            self.log.info(
                "bank_commit_dropped", session=req.session, generation=req.generation,
                reason=reason,
            )

    def stats(self) -> dict[str, int]:
        """Counters for admin and metrics."""
        return {
            "committed": self.committed,
            "stored": self.stored,
            "bytes_stored": self.bytes_stored,
            **{f"dropped_{k}": v for k, v in self.dropped.items()},
        }
