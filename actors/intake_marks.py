"""How many times the node's death cut a prompt's admission: marks of the prompts in hand.

JetStream's delivery count cannot tell. It counts deferrals too (a prompt offered again by
design), and a node taking a partition over recreates its consumer, which starts the count
again. So admission marks a prompt in flight before it handles it and takes the mark away
once it settled or deferred the prompt, alive; a mark found when the prompt comes back is a
delivery a node's death cut. A prompt found with ``CRASH_LIMIT`` marks is set aside.

The marks are a stream of their own, one subject per intake sequence holding one message:
the count. Taking a mark away deletes that message (a KV delete would leave a marker behind
for every prompt); one whose removal was lost ages out after ``MARK_AGE_S``. The marks are
a safety net: when they cannot be read or written, admission goes on without them.
"""

from __future__ import annotations

import json

import structlog
from nats.aio.client import Client
from nats.js.errors import APIError

from schemas.subjects import EXPECTED_SUBJECT_SEQ_HEADER, Subjects

MARK_AGE_S = 7 * 24 * 3600.0
"""How long a mark whose removal was lost is kept (longer than any crash loop)."""
_WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code for a publish whose expected last subject sequence is not it."""

log = structlog.get_logger("intake_marks")


class IntakeMarks:
    """The in-flight marks of the intake's prompts (``open()`` once, before use)."""

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self.ready = False
        """False until the stream is found (or when it is not): prompts go unmarked."""

    async def open(self) -> None:
        """Find the marks' stream (``node.streams.ensure_streams`` makes it)."""
        try:
            await self.js.stream_info(self.subjects.intake_marks_stream)
        except Exception as e:
            log.warning("intake_marks_unavailable", error=repr(e))
            return
        self.ready = True

    async def begin(self, intake_seq: int) -> tuple[int, int | None]:
        """Mark the prompt in flight: the deliveries a node's death cut before this one, and
        the mark's sequence to ``end`` (None when the marks are out of reach)."""
        if not self.ready:
            return 0, None
        subject = self.subjects.intake_mark(intake_seq)
        try:
            return 0, await self._put(subject, 0, 0)
        except APIError as e:
            if e.err_code != _WRONG_LAST_SEQUENCE:
                return self._unmarked(intake_seq, e)
        except Exception as e:  # no answer (a reconnect, a leader election)
            return self._unmarked(intake_seq, e)
        try:  # marked already: earlier deliveries were cut
            last = await self.js.get_last_msg(self.subjects.intake_marks_stream, subject)
            cuts = int(last.data or b"0")
            return cuts, await self._put(subject, cuts, last.seq or 0)
        except Exception as e:
            return self._unmarked(intake_seq, e)

    async def _put(self, subject: str, cuts: int, last: int) -> int:
        # The expected last sequence makes two deliveries of one prompt count once each.
        ack = await self.js.publish(
            subject, str(cuts + 1).encode(), headers={EXPECTED_SUBJECT_SEQ_HEADER: str(last)}
        )
        return ack.seq

    def _unmarked(self, intake_seq: int, error: Exception) -> tuple[int, None]:
        log.warning("intake_mark_failed", intake_seq=intake_seq, error=repr(error))
        return 0, None

    async def end(self, mark: int | None) -> None:
        """Take a mark away: its delivery ended with the node alive."""
        if mark is None:
            return
        stream = self.subjects.intake_marks_stream
        # Not erased (overwritten) first, as nats-py's delete_msg asks: a mark is no secret,
        # and erasing costs the server several times the delete (~1 ms against ~0.25 ms).
        body = json.dumps({"seq": mark, "no_erase": True}).encode()
        try:
            reply = await self.nc.request(self.subjects.stream_message_delete(stream), body)
            error = json.loads(reply.data).get("error")
        except Exception as e:
            error = repr(e)
        if error:  # aged out later; only a crash count it could have raised
            log.warning("intake_mark_not_removed", mark=mark, error=str(error))
