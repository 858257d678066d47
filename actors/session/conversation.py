"""What a turn's engine request carries of the session: its system head and window.

The record log keeps every message, and the window only moves forward, so the messages
after the system head and before the recorded window are never shown to the model again.
A turn leaves them out of its request (counting them in ``omitted``), so what a turn costs
to send, decode and render stays the size of its window however long the session's log
grows. A turn under ``refuse`` sends them all: that policy judges the whole conversation,
so the messages the state no longer holds (``SessionState.dropped``) are read back from the
log for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.session.state import HistoryItem, Pending, SessionState, system_head
from schemas.chat import ChatMessage


@dataclass(frozen=True)
class Conversation:
    """The messages of one turn's request and where its window starts."""

    messages: tuple[ChatMessage, ...]
    """The system head, the history from the window on, and the turn's input."""
    assistant_tokens: dict[int, tuple[int, ...]]
    """Exact token ids of assistant messages, by index in ``messages``."""
    model_id: str | None
    """Model those token ids belong to."""
    window_start: int
    """Index in the whole conversation (``omitted`` counted) where the window starts."""
    omitted: int = 0
    """History messages between the system head and the window that ``messages`` leaves out."""
    omitted_turns: int = 0
    """Whole turns among them."""


class WindowCut:
    """Where one session's window starts in its history and how many whole turns lie before
    it, kept from turn to turn: the history only grows and the window only moves forward,
    so a turn looks at the messages its window passed since the last one, not at all."""

    def __init__(self) -> None:
        self.record_id: str | None = None
        """The window's first record when it was last found."""
        self.start = 0
        """Its index in the history."""
        self.turns = 0
        """Whole turns between the system head and it."""

    def find(self, history: list[HistoryItem], head: int, record_id: str | None) -> int:
        """Index of ``record_id`` in ``history`` (0 when None or not there); counts the turns
        before it."""
        if record_id is None:
            return 0
        if self._holds(history, self.record_id) and self.record_id == record_id:
            return self.start
        start = next((i for i in range(len(history) - 1, -1, -1)
                      if history[i].record_id == record_id), 0)
        since = self.start if self._holds(history, self.record_id) and self.start <= start else head
        before = self.turns if since > head else 0
        self.record_id, self.start = record_id, start
        self.turns = before + sum(1 for h in history[since:start] if h.message.role == "user")
        return start

    def _holds(self, history: list[HistoryItem], record_id: str | None) -> bool:
        return record_id is not None and self.start < len(history) and (
            history[self.start].record_id == record_id
        )


def conversation(
    st: SessionState, taken: list[Pending], cut: WindowCut, whole: bool,
    history: list[HistoryItem] | None = None,
) -> Conversation:
    """The request's conversation for a turn over ``taken``; ``whole`` keeps every message,
    those the state dropped taken from ``history`` (the whole history, read from the log).

    Only the system head and the window are walked, so the request is built in the
    window's time, not the log's.
    """
    held = st.history
    head = system_head(held)
    found = cut.find(held, head, st.window_from)
    moved = found > head and held[found].message.role == "user"
    # In the whole conversation the dropped messages lie between the head and what is held.
    at = max(found, head) + st.dropped if st.dropped else found
    if whole:
        assert history is not None or not st.dropped, "the whole history is read from the log"
        messages, tokens, model_id = st.messages_for(taken, history)
        return Conversation(messages, tokens, model_id, at)
    if not moved and not st.dropped:
        messages, tokens, model_id = st.messages_for(taken)
        return Conversation(messages, tokens, model_id, at)
    start = found if moved else head
    kept = held[:head] + held[start:]
    tokens = {i: h.token_ids for i, h in enumerate(kept) if h.token_ids}
    model_id = next((h.model_id for h in reversed(kept) if h.model_id), None)
    messages = tuple(h.message for h in kept) + tuple(p.record.message for p in taken)
    return Conversation(
        messages, tokens, model_id, at, omitted=st.dropped + start - head,
        omitted_turns=st.dropped_turns + (cut.turns if moved else 0),
    )
