"""A session's state as its record log defines it; rebuilt from the log after a restart.

Pure data, no I/O: the session runner owns one and is its only writer. Replaying the log
(``apply``) must leave the state the live runner had, so every change the runner makes is
one that a record implies: a turn start takes every pending message as its input, a commit
moves them into the history, an abort puts them back.

Pending messages come in three kinds. A message whose prompt asked for a reply waits for
the next turn. A ``reply: false`` append waits only to be part of the next turn's input (or
joins the history when no turn is coming). The input of an aborted turn is *deferred*: it
waits for a retry (a prompt with no messages), which answers it and supersedes the abort's
provisional record; a new prompt with messages instead keeps it as plain context and leaves
the provisional as the honest, final ABORTED turn.

The history holds the system head and the window, not what lies between: the window only
moves forward, so a commit that moves it drops the messages it passed (``dropped`` counts
them, indexes in the whole conversation count them too). They stay in the record log, which
the admin history and a ``refuse`` turn (judged on the whole conversation) read; a session
that lives for thousands of turns holds the RAM of its window, not of its log.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from schemas.chat import ChatMessage
from schemas.records import (
    CRASH_LIMIT,
    RERUN_REASONS,
    AbortRecord,
    AssistantRecord,
    CommitRecord,
    DeleteRecord,
    ProvisionalRecord,
    Record,
    RelayGrantRecord,
    ToolsRecord,
    TurnStartRecord,
    UserRecord,
)
from schemas.tools import Tool

_K = TypeVar("_K", int, str)

RETRIED_REASONS = RERUN_REASONS
"""Abort reasons after which a turn's prompts are answered without being asked again."""
CRASHED = "repeated_crash"
"""Abort reason of a turn whose input a node's death cut ``CRASH_LIMIT`` times: set aside."""
DROPPED_REASONS = frozenset({"context_overflow", "too_large", CRASHED})
"""Abort reasons after which a turn's input is dropped: it can never be answered."""
SEEN_PER_SESSION = 1024
"""Intake sequences and idempotency keys a session remembers (the most recent ones).

A redelivery concerns a prompt recorded but not yet acked, and admission acks right after
recording, so only recent sequences can come back; keeping every one would grow a
session's memory with every turn it ever ran."""


def message_bytes(message: ChatMessage) -> int:
    """What a message weighs in the record log and in a turn's request (its JSON)."""
    return len(message.model_dump_json())


@dataclass
class HistoryItem:
    """One message of the committed conversation."""

    record_id: str
    message: ChatMessage
    token_ids: tuple[int, ...] | None = None
    model_id: str | None = None


@dataclass
class Pending:
    """A recorded user message not yet in the history."""

    record: UserRecord
    wants_reply: bool
    """True when the next turn answers it (it becomes one of the turn's parents)."""
    deferred: bool = False
    """Input of an aborted turn, waiting for a retry (never folded as an append)."""
    supersedes: str | None = None
    """The provisional record of the aborted turn that last answered it."""
    nbytes: int = 0
    """Size of the message (``message_bytes``), counted against the pending bound."""
    cut: int = 0
    """Turns over it that a node's death cut (``node_restart`` aborts)."""


@dataclass
class SessionState:
    """History, pending messages, generation, and what was already recorded."""

    session: str
    generation: int = 0
    history: list[HistoryItem] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)
    intake_seqs: dict[int, tuple[str, ...]] = field(default_factory=dict)
    """Record ids written for each intake sequence (a redelivery is recognised by it)."""
    keys: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Record ids written for each idempotency key."""
    key_digests: dict[str, str] = field(default_factory=dict)
    """Digest of the prompt each idempotency key was first recorded for."""
    relay_grants: frozenset[str] = frozenset()
    """Sessions whose relayed answers this session accepts (its latest grant)."""
    records: int = 0
    recorded_bytes: int = 0
    """Bytes of every message the session recorded (user and assistant): its log's size."""
    last_assistant: dict[str, AssistantRecord] = field(default_factory=dict)
    open_turn: TurnStartRecord | None = None
    """A turn start with no commit or abort yet (only during a rebuild)."""
    open_taken: list[Pending] = field(default_factory=list)
    """The input of ``open_turn``."""
    tools: tuple[Tool, ...] = ()
    """The session's current tool set (the last ``ToolsRecord``)."""
    window_from: str | None = None
    """Record id of the first message after the system head that the model still sees (the
    last commit's ``window_from``); None: the window never moved."""
    dropped: int = 0
    """History messages between the system head and the window no longer held (in the log)."""
    dropped_turns: int = 0
    """User messages among them."""
    dropped_calls: set[str] = field(default_factory=set)
    """Ids of the tool calls their assistant messages made (a tool result may still answer one)."""
    keep_history: bool = False
    """Keep every message, dropping none (a replay for the whole conversation)."""

    # -- admits ----------------------------------------------------------------------------
    def add_user(self, record: UserRecord) -> None:
        """A user message was recorded."""
        if record.reply:
            self.keep_deferred_as_context()
        nbytes = message_bytes(record.message)
        self.recorded_bytes += nbytes
        self.pending.append(Pending(record, record.reply, nbytes=nbytes))
        if record.intake_seq is not None:
            _remember(self.intake_seqs, record.intake_seq, record.id)
        if record.idempotency_key:
            _remember(self.keys, record.idempotency_key, record.id)
            if record.prompt_digest:
                self.key_digests.setdefault(record.idempotency_key, record.prompt_digest)
                while len(self.key_digests) > SEEN_PER_SESSION:  # bounded as ``keys`` is
                    del self.key_digests[next(iter(self.key_digests))]

    def pending_bytes(self) -> int:
        """Bytes of the messages waiting for a turn (or to join the history)."""
        return sum(p.nbytes for p in self.pending)

    def call_ids(self) -> set[str]:
        """Ids of every tool call the conversation holds (history, dropped, and pending)."""
        messages = [h.message for h in self.history] + [p.record.message for p in self.pending]
        return {c.id for m in messages for c in m.tool_calls or ()} | self.dropped_calls

    def history_len(self) -> int:
        """Messages of the committed conversation, those dropped from RAM included."""
        return len(self.history) + self.dropped

    def has_deferred(self) -> bool:
        """True while an aborted turn's input waits for a retry."""
        return any(p.deferred for p in self.pending)

    def retry_deferred(self) -> bool:
        """A retry was asked for: deferred inputs want their reply again."""
        found = False
        for p in self.pending:
            if p.deferred:
                p.deferred, p.wants_reply, found = False, True, True
        return found

    def keep_deferred_as_context(self) -> None:
        """A new question instead of a retry: deferred inputs stay context, unanswered."""
        for p in self.pending:
            if p.deferred:
                p.deferred, p.wants_reply, p.supersedes = False, False, None

    # -- turns -----------------------------------------------------------------------------
    def wants_turn(self) -> bool:
        """True when a pending message asks for a reply."""
        return any(p.wants_reply for p in self.pending)

    def fold_unanswered_appends(self) -> None:
        """With no turn to come, ``reply: false`` messages join the history now.

        Nothing is folded while a deferred input waits: the history keeps log order.
        """
        if self.wants_turn() or self.has_deferred():
            return
        self.history.extend(HistoryItem(p.record.id, p.record.message) for p in self.pending)
        self.pending = []

    def take_pending(self) -> list[Pending]:
        """Everything pending becomes the input of the next turn."""
        taken, self.pending = self.pending, []
        return taken

    def put_back(self, taken: list[Pending]) -> None:
        """A turn could not start: its input is pending again, ahead of newer messages."""
        self.pending = taken + self.pending

    def commit(
        self, taken: list[Pending], assistant: AssistantRecord, commit: CommitRecord
    ) -> None:
        """A turn over ``taken`` was committed."""
        self.history.extend(HistoryItem(p.record.id, p.record.message) for p in taken)
        self.history.append(
            HistoryItem(assistant.id, assistant.message, assistant.token_ids, assistant.model_id)
        )
        self.recorded_bytes += message_bytes(assistant.message)
        self.generation = commit.generation
        self.window_from = commit.window_from
        if not self.keep_history:
            self.drop_before_window()

    def drop_before_window(self) -> None:
        """Forget the messages between the system head and the window: never sent again."""
        head = system_head(self.history)
        start = self.window_index()
        if start <= head or self.history[start].message.role != "user":
            return  # the window starts at the head, or where no turn starts: all is sent
        passed = self.history[head:start]
        self.dropped += len(passed)
        self.dropped_turns += sum(1 for h in passed if h.message.role == "user")
        self.dropped_calls.update(c.id for h in passed for c in h.message.tool_calls or ())
        del self.history[head:start]

    def abort(self, taken: list[Pending], provisional_id: str, reason: str) -> None:
        """A turn over ``taken`` was aborted; the generation stays."""
        if reason in DROPPED_REASONS:
            return
        retry = reason in RETRIED_REASONS
        back = []
        for p in taken:
            answered = p.wants_reply
            back.append(Pending(
                p.record,
                wants_reply=retry and answered,
                deferred=not retry and answered,
                supersedes=provisional_id if answered else None,
                nbytes=p.nbytes,
                cut=p.cut + int(reason == "node_restart" and answered),
            ))
        self.pending = back + self.pending

    def interrupted_reason(self) -> str:
        """The abort reason of the open turn a node's death cut: ``node_restart`` (it runs
        again), or ``CRASHED`` when this is the ``CRASH_LIMIT``-th cut of its input."""
        cuts = 1 + max((p.cut for p in self.open_taken if p.wants_reply), default=0)
        return CRASHED if cuts >= CRASH_LIMIT else "node_restart"

    def window_index(self) -> int:
        """Index in ``history`` (as held) where the window starts; 0 when it never moved or
        its record is not held. Searched from the end: the window is the history's tail."""
        if self.window_from is None:
            return 0
        return next((i for i in range(len(self.history) - 1, -1, -1)
                     if self.history[i].record_id == self.window_from), 0)

    def window_start(self) -> int:
        """Index in the whole conversation where the window starts (the dropped messages
        counted); 0 when it never moved. Sent with every turn: a node that never ran the
        session (a move, a restart) shows the model what the last one did."""
        start = self.window_index()
        return start + self.dropped if start >= system_head(self.history) else start

    def record_at(self, taken: list[Pending], index: int) -> str | None:
        """Record id of message ``index`` of the whole conversation over ``taken`` (the
        dropped messages counted); one of them: the window, which never moves back."""
        head = system_head(self.history)
        if head <= index < head + self.dropped:
            return self.window_from
        if index >= head:
            index -= self.dropped
        if index < len(self.history):
            return self.history[index].record_id
        rest = index - len(self.history)
        return taken[rest].record.id if rest < len(taken) else None

    def messages_for(
        self, taken: list[Pending], history: list[HistoryItem] | None = None
    ) -> tuple[tuple[ChatMessage, ...], dict[int, tuple[int, ...]], str | None]:
        """Conversation for a turn over ``taken``, with known assistant token ids; over
        ``history`` (the whole one, read from the log) instead of the held one if given."""
        held = self.history if history is None else history
        msgs = [h.message for h in held] + [p.record.message for p in taken]
        tokens = {i: h.token_ids for i, h in enumerate(held) if h.token_ids}
        model = next((h.model_id for h in reversed(held) if h.model_id), None)
        return tuple(msgs), tokens, model


def system_head(history: list[HistoryItem]) -> int:
    """How many leading system messages there are: they always stay in the window."""
    n = 0
    while n < len(history) and history[n].message.role == "system":
        n += 1
    return n


def _remember(seen: dict[_K, tuple[str, ...]], key: _K, record_id: str) -> None:
    """Add ``record_id`` under ``key``, forgetting the oldest keys past the bound."""
    seen[key] = (*seen.get(key, ()), record_id)
    while len(seen) > SEEN_PER_SESSION:
        del seen[next(iter(seen))]


def parents_of(taken: list[Pending]) -> tuple[str, ...]:
    """The user messages a turn over ``taken`` answers."""
    return tuple(p.record.id for p in taken if p.wants_reply)


def supersedes_of(taken: list[Pending]) -> str | None:
    """The provisional record a turn over ``taken`` replaces, when it is a retry."""
    return next((p.supersedes for p in reversed(taken) if p.wants_reply and p.supersedes), None)


# -- rebuild ----------------------------------------------------------------------------------
def apply(state: SessionState, record: Record) -> None:
    """Replay one record of the log onto ``state``."""
    state.records += 1
    if isinstance(record, UserRecord):
        state.add_user(record)
    elif isinstance(record, ToolsRecord):
        state.tools = record.tools
    elif isinstance(record, TurnStartRecord):
        _replay_turn_start(state, record)
    elif isinstance(record, AssistantRecord):
        state.last_assistant[record.turn_id] = record
    elif isinstance(record, CommitRecord):
        assistant = state.last_assistant.pop(record.turn_id, None)
        if assistant is not None:
            state.commit(_close_open_turn(state, record.parent_ids), assistant, record)
    elif isinstance(record, AbortRecord):
        parents = state.open_turn.parent_ids if state.open_turn else ()
        state.abort(_close_open_turn(state, parents), record.provisional_id, record.reason)
    elif isinstance(record, RelayGrantRecord):
        state.relay_grants = frozenset(record.sources)
    elif isinstance(record, ProvisionalRecord):
        pass
    elif isinstance(record, DeleteRecord):
        fresh = SessionState(state.session, keep_history=state.keep_history)
        state.__dict__.update(fresh.__dict__)


def _replay_turn_start(state: SessionState, record: TurnStartRecord) -> None:
    # The live runner took every pending message; one that is not an input had been folded
    # into the history before the turn, so it goes there first (log order).
    inputs, parents = set(record.input_ids) | set(record.parent_ids), set(record.parent_ids)
    folded = [p for p in state.pending if p.record.id not in inputs]
    state.history.extend(HistoryItem(p.record.id, p.record.message) for p in folded)
    taken = [p for p in state.pending if p.record.id in inputs]
    state.pending = []
    for p in taken:
        p.wants_reply, p.deferred = p.record.id in parents, False
    state.open_turn, state.open_taken = record, taken


def _close_open_turn(state: SessionState, parent_ids: tuple[str, ...]) -> list[Pending]:
    if state.open_turn is not None:
        taken = state.open_taken
    else:  # a log without turn starts: the parents are the input
        ids = set(parent_ids)
        taken = [p for p in state.pending if p.record.id in ids]
        state.pending = [p for p in state.pending if p.record.id not in ids]
    state.open_turn, state.open_taken = None, []
    return taken


def rebuild(
    session: str, records: Iterable[Record], keep_history: bool = False
) -> SessionState:
    """State of ``session`` after replaying its records."""
    state = SessionState(session, keep_history=keep_history)
    for r in records:
        apply(state, r)
    return state
