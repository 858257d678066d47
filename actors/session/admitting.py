"""A session runner's admit step: check an admitted prompt, record it, answer admission.

``Admitter`` is owned by its ``SessionRunner`` (``actors/session/runner.py``) and runs only
as a step of the runner's mailbox. It shares the runner's state and bus, is told whether a
turn runs and whether the session is being deleted, and says whether the prompt was
recorded; starting the next turn stays the runner's.
"""

from __future__ import annotations

import time

from actors.session.admit import SessionLimits, key_conflict, prompt_bytes, refusal
from actors.session.io import RunnerIO
from actors.session.mailbox import Admit, rejected
from actors.session.records import new_id
from actors.session.state import SessionState
from actors.session.tools import tool_refusal
from schemas.errors import ErrorCode, InferError
from schemas.internal import AdmitReply, AdmitRequest
from schemas.messages import AcceptedEvent
from schemas.records import RelayGrantRecord, ToolsRecord, TurnParams, UserRecord
from schemas.subjects import EventKind


class Admitter:
    """Checks and records the prompts admitted to one session."""

    def __init__(self, io: RunnerIO, state: SessionState, limits: SessionLimits) -> None:
        self.io = io
        self.state = state
        self.limits = limits
        """What the session may hold and have waiting."""
        self.session = state.session

    async def admit(self, cmd: Admit, running: bool, deleting: bool) -> bool:
        """Record the prompt's messages and answer admission (``cmd.done``); True when the
        prompt was recorded now, so a turn may start over it if none is ``running``."""
        req, st = cmd.req, self.state
        prompt = req.prompt
        seen: tuple[str, ...] = ()
        if req.intake_seq is not None:
            seen = st.intake_seqs.get(req.intake_seq, ())
        key = req.idempotency_key
        if deleting:
            err = InferError(ErrorCode.GONE, f"session {self.session} is being deleted")
            cmd.done.set_result(rejected(err))
            return False
        if len(seen) >= max(len(prompt.messages), 1):  # a redelivery of what is recorded
            cmd.done.set_result(
                AdmitReply(outcome="duplicate", message_ids=seen, generation=st.generation)
            )
            return False
        if not seen and key and key in st.keys:
            await self._repeated_key(cmd, key)
            return False
        if not seen:  # a redelivery of a partly recorded prompt was checked the first time
            refused = self._refusal(req, running)
            if refused is not None:
                cmd.done.set_result(rejected(refused))
                return False
        ids = list(seen)
        await self._record(req, ids, fresh=not seen)
        if prompt.reply and not prompt.messages and prompt.accept_relays_from is None:
            st.retry_deferred()
        cmd.done.set_result(
            AdmitReply(outcome="recorded", message_ids=tuple(ids), generation=st.generation)
        )
        await self.io.event(self.session, EventKind.ACCEPTED, AcceptedEvent(
            session=self.session, message_ids=tuple(ids), generation=st.generation,
            idempotency_key=key,
        ))
        return True

    async def _repeated_key(self, cmd: Admit, key: str) -> None:
        """A key seen before: a retry is answered ``duplicate``; another prompt is refused."""
        st, prompt = self.state, cmd.req.prompt
        conflict = key_conflict(st, key, prompt, ask=cmd.req.answer_to is not None)
        if conflict is not None:
            cmd.done.set_result(rejected(conflict))
            return
        known = st.keys[key]
        cmd.done.set_result(
            AdmitReply(outcome="duplicate", message_ids=known, generation=st.generation)
        )
        await self.io.event(self.session, EventKind.ACCEPTED, AcceptedEvent(
            session=self.session, message_ids=known, generation=st.generation,
            idempotency_key=key, duplicate=True,
        ))

    async def _record(self, req: AdmitRequest, ids: list[str], fresh: bool) -> None:
        """Record the prompt's grant and messages. A fresh prompt's bytes are held against
        the node-wide bound from its check until its records count them, so admits to many
        sessions at once cannot all pass one check."""
        node = self.limits.node if fresh else None
        size = prompt_bytes(req.prompt) if node is not None else 0
        if node is not None:
            node.reserved += size
        try:
            if fresh and req.prompt.accept_relays_from is not None:
                await self._record_grant(req.prompt.accept_relays_from)
            await self._record_messages(req, ids)
        finally:
            if node is not None:
                node.reserved -= size

    def _refusal(self, req: AdmitRequest, running: bool) -> InferError | None:
        refused = refusal(self.state, req.prompt, running, self.limits)
        return refused or tool_refusal(self.state, req.prompt)

    async def _record_grant(self, sources: tuple[str, ...]) -> None:
        record = RelayGrantRecord(id=new_id("grant"), sources=sources, ts=time.time())
        await self._append_or_retry(record)
        self.state.relay_grants = frozenset(sources)

    async def _record_messages(self, req: AdmitRequest, ids: list[str]) -> None:
        prompt = req.prompt
        params = TurnParams.of(prompt, relay_to=prompt.relay_to, answer_to=req.answer_to)
        if prompt.tools is not None and prompt.tools != self.state.tools and not ids:
            await self._append_or_retry(ToolsRecord(
                id=new_id("tools"), tools=prompt.tools, intake_seq=req.intake_seq,
                ts=time.time(),
            ))
            self.state.tools = prompt.tools
        digest = prompt.digest() if req.idempotency_key else None
        for m in prompt.messages[len(ids):]:
            record = UserRecord(
                id=new_id("msg"), message=m, intake_seq=req.intake_seq,
                idempotency_key=req.idempotency_key, reply=prompt.reply, params=params,
                prompt_digest=digest,
                ts=time.time(),
            )
            await self._append_or_retry(record)
            self.state.add_user(record)
            ids.append(record.id)

    async def _append_or_retry(
        self, record: UserRecord | ToolsRecord | RelayGrantRecord
    ) -> None:
        try:
            await self.io.append(self.session, record)
        except Exception as e:  # left in intake: admission offers it again
            raise InferError(
                ErrorCode.UNAVAILABLE,
                f"the record log did not store the prompt ({e!r}); it is retried",
            ) from e


__all__ = ["Admitter"]
