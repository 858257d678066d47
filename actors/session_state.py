"""A session's state as its record log defines it; rebuilt from the log after a restart.

Pure data, no I/O: the session runner owns one and is its only writer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas.chat import ChatMessage
from schemas.records import (
    AbortRecord,
    AssistantRecord,
    CommitRecord,
    DeleteRecord,
    ProvisionalRecord,
    Record,
    TurnStartRecord,
    UserRecord,
)


RETRIED_REASONS = frozenset({"shutdown", "node_restart"})
"""Abort reasons after which a turn's prompts are answered without being asked again."""


@dataclass
class HistoryItem:
    """One message of the committed conversation."""

    record_id: str
    message: ChatMessage
    token_ids: tuple[int, ...] | None = None
    model_id: str | None = None


@dataclass
class Pending:
    """A recorded user message not yet answered."""

    record: UserRecord
    wants_reply: bool
    """False for ``reply: false`` appends and for the parents of a client-aborted turn."""
    deferred: bool = False
    """Input of an aborted turn, waiting for a retry (never folded as an append)."""


@dataclass
class SessionState:
    """History, pending messages, generation, and what was already recorded."""

    session: str
    generation: int = 0
    history: list[HistoryItem] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)
    intake_seqs: set[int] = field(default_factory=set)
    keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    superseded_by_next: str | None = None
    """Provisional record the next committed turn supersedes."""
    records: int = 0
    last_assistant: dict[str, AssistantRecord] = field(default_factory=dict)
    open_turn: TurnStartRecord | None = None
    """A turn start with no commit or abort yet (only during a rebuild)."""

    # -- changes ----------------------------------------------------------------------------
    def add_user(self, record: UserRecord) -> None:
        """A user message was recorded."""
        self.pending.append(Pending(record, record.reply))
        if record.intake_seq is not None:
            self.intake_seqs.add(record.intake_seq)
        if record.idempotency_key:
            ids = self.keys.get(record.idempotency_key, ())
            self.keys[record.idempotency_key] = (*ids, record.id)

    def wants_turn(self) -> bool:
        """True when a pending message asks for a reply."""
        return any(p.wants_reply for p in self.pending)

    def retry_deferred(self) -> bool:
        """A retry was asked for: deferred inputs want their reply again."""
        found = False
        for p in self.pending:
            if p.deferred:
                p.deferred, p.wants_reply, found = False, True, True
        return found

    def fold_unanswered_appends(self) -> None:
        """With no turn to come, ``reply: false`` messages join the history now."""
        if not self.wants_turn():
            for p in self.pending:
                if not p.deferred:
                    self.history.append(HistoryItem(p.record.id, p.record.message))
            self.pending = [p for p in self.pending if p.deferred]

    def take_pending(self) -> list[Pending]:
        """Everything pending becomes the input of the next turn."""
        taken, self.pending = self.pending, []
        return taken

    def commit(self, taken: list[Pending], assistant: AssistantRecord, commit: CommitRecord) -> None:
        """A turn over ``taken`` was committed."""
        for p in taken:
            self.history.append(HistoryItem(p.record.id, p.record.message))
        self.history.append(
            HistoryItem(assistant.id, assistant.message, assistant.token_ids, assistant.model_id)
        )
        self.generation = commit.generation
        self.superseded_by_next = None

    def abort(self, taken: list[Pending], provisional_id: str, retry: bool) -> None:
        """A turn over ``taken`` was aborted: its inputs wait again for a retry."""
        self.pending = [
            Pending(p.record, retry and p.record.reply, deferred=not retry) for p in taken
        ] + self.pending
        self.superseded_by_next = provisional_id

    def messages_for(self, taken: list[Pending]) -> tuple[tuple[ChatMessage, ...], dict[int, tuple[int, ...]], str | None]:
        """Conversation for a turn over ``taken``, with known assistant token ids."""
        msgs = [h.message for h in self.history] + [p.record.message for p in taken]
        tokens = {i: h.token_ids for i, h in enumerate(self.history) if h.token_ids}
        model = next((h.model_id for h in reversed(self.history) if h.model_id), None)
        return tuple(msgs), tokens, model  # type: ignore[return-value]

    # -- rebuild ---------------------------------------------------------------------------
    def apply(self, record: Record) -> None:
        """Replay one record of the log."""
        self.records += 1
        if isinstance(record, UserRecord):
            self.add_user(record)
        elif isinstance(record, TurnStartRecord):
            self.open_turn = record
        elif isinstance(record, AssistantRecord):
            self.last_assistant[record.turn_id] = record
        elif isinstance(record, CommitRecord):
            assistant = self.last_assistant.pop(record.turn_id)
            inputs = set(record.parent_ids)
            if self.open_turn is not None:
                inputs |= set(self.open_turn.input_ids)
            taken = [p for p in self.pending if p.record.id in inputs]
            self.pending = [p for p in self.pending if p not in taken]
            self.commit(taken, assistant, record)
            self.open_turn = None
        elif isinstance(record, AbortRecord):
            turn = self.open_turn
            inputs = set(turn.input_ids) | set(turn.parent_ids) if turn else set()
            taken = [p for p in self.pending if p.record.id in inputs]
            self.pending = [p for p in self.pending if p not in taken]
            if record.reason == "context_overflow":
                taken = []
            self.abort(taken, record.provisional_id, retry=record.reason in RETRIED_REASONS)
            self.open_turn = None
        elif isinstance(record, ProvisionalRecord):
            pass
        elif isinstance(record, DeleteRecord):
            self.__init__(self.session)  # type: ignore[misc]


def rebuild(session: str, records: Iterable[Record]) -> SessionState:
    """State of ``session`` after replaying its records."""
    state = SessionState(session)
    for r in records:
        state.apply(r)
    return state
