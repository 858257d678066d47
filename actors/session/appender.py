"""The fenced append: how a record reaches a session's log at most once, from its owner only.

A ``RecordAppender`` is the one writer of the record stream for the sessions this node
serves. It knows the stream sequence of each session's last record (the fence of its next
append) and nothing else; the runners append through it (``BusIO.append``), and the host
tells it what a rebuild found in the log.
"""

from __future__ import annotations

import asyncio

import structlog
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from actors.base import encode
from actors.ownership import Ownership
from schemas.errors import ErrorCode, InferError
from schemas.records import Record
from schemas.subjects import EXPECTED_SUBJECT_SEQ_HEADER, MSG_ID_HEADER, NODE_HEADER, Subjects

log = structlog.get_logger("session_runners")

WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code for an expected-last-subject-sequence that does not hold."""
SERVICE_UNAVAILABLE = 503
"""JetStream's status while a stream has no leader: nothing stored, ask again."""
APPEND_TRIES = 4
APPEND_RETRY_S = 0.25
"""An append without an answer is sent again after 0.25, 0.5 and 1 s, then given up."""


def not_owned(session: str, why: str) -> InferError:
    """The error of an append this node may not make: the prompt stays for the owner."""
    return InferError(
        ErrorCode.UNAVAILABLE,
        f"this node no longer owns session {session} ({why}); the node that does answers it",
    )


class RecordAppender:
    """Appends records to the sessions' logs, fenced by lease and by the last sequence."""

    def __init__(self, js: JetStreamContext, subjects: Subjects, ownership: Ownership) -> None:
        self.js = js
        self.subjects = subjects
        self.ownership = ownership
        self._last_seq: dict[str, int] = {}
        """Stream sequence of each session's last record: the fence of its next append."""

    def learn(self, last_seq: dict[str, int]) -> None:
        """Take the last sequences a replay of the log found (sessions rebuilt here)."""
        self._last_seq.update(last_seq)

    async def append(self, session: str, record: Record) -> None:
        """Append a record to the session's durable log (returns once stored, exactly once).

        Fenced twice: this node appends only while its lease on the session's partition is
        valid by its own clock, and JetStream stores the record only if the session's last
        record is the one this node knows (``Nats-Expected-Last-Subject-Sequence``), so a
        node that lost the partition cannot write after the new owner did.

        An append whose answer is lost (a timeout, no responders, the connection gone) may
        or may not be stored; it is sent again, a few times over about two seconds. The same
        fence makes that safe: if the first copy was stored, the next is refused as stale,
        and the log's last record, carrying this record's id, says it is in. Still without
        an answer, the error is raised (the caller defers, and the record log may or may not
        hold the record); the session's next append then finds the log ahead of what this
        node knows and gives the partition up, so the session is rebuilt from the log rather
        than recording a prompt or a turn twice.
        """
        delay = APPEND_RETRY_S
        for attempt in range(APPEND_TRIES):
            if not self.ownership.valid(session):
                raise not_owned(session, "its partition's lease lapsed")
            headers = {
                MSG_ID_HEADER: record.id, NODE_HEADER: self.ownership.node,
                EXPECTED_SUBJECT_SEQ_HEADER: str(self._last_seq.get(session, 0)),
            }
            try:
                ack = await self.js.publish(
                    self.subjects.records(session), encode(record), headers=headers
                )
            except APIError as e:
                if e.err_code == WRONG_LAST_SEQUENCE:
                    stored = await self._resync(session, record.id)
                    if stored:
                        return
                    if stored is not None:
                        continue
                elif e.code != SERVICE_UNAVAILABLE or attempt == APPEND_TRIES - 1:
                    raise
            except Exception as e:  # the answer was lost: stored or not, it is asked again
                if attempt == APPEND_TRIES - 1:
                    raise
                log.warning("append_unconfirmed", session=session, record=record.id,
                            error=repr(e), retry_in_s=delay)
            else:
                self._last_seq[session] = ack.seq
                return
            await asyncio.sleep(delay)
            delay *= 2
        raise InferError(ErrorCode.UNAVAILABLE,
                         f"the record log of session {session} could not be read; retried")

    async def _resync(self, session: str, record_id: str) -> bool | None:
        """After an append refused as stale: True when the log's last record is this very
        record (an earlier copy was stored and its answer lost); False when the session's
        records are gone (the stream's age or size limit), so the append may be made again;
        None when the log could not be read now. When another node wrote last, or this node
        wrote a record its runner never heard was stored, the partition is given up
        (fenced): whoever owns it next rebuilds the session from the log."""
        try:
            last = await self.js.get_last_msg(
                self.subjects.record_stream, self.subjects.records(session)
            )
        except NotFoundError:
            self._last_seq[session] = 0
            return False
        except Exception as e:  # the log is unavailable now: the append is asked again
            log.warning("append_resync_failed", session=session, error=repr(e))
            return None
        headers = last.headers or {}
        if headers.get(MSG_ID_HEADER) == record_id:
            self._last_seq[session] = last.seq or 0
            return True
        why = ("another node wrote to it" if headers.get(NODE_HEADER) != self.ownership.node
               else "its log holds a record this node did not know was stored")
        log.warning("append_fenced", actor="session_runners", session=session, why=why)
        self.ownership.fenced(session)
        raise not_owned(session, why)
