"""What a turn's engine request carries of the session: its system head and window.

The record log keeps every message, and the window only moves forward, so the messages
after the system head and before the recorded window are never shown to the model again.
A turn leaves them out of its request (counting them in ``omitted``), so what a turn costs
to send, decode and render stays the size of its window however long the session's log
grows. A turn under ``refuse`` sends them all: that policy judges the whole conversation.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.session.state import HistoryItem, Pending, SessionState
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


def conversation(st: SessionState, taken: list[Pending], whole: bool) -> Conversation:
    """The request's conversation for a turn over ``taken``; ``whole`` keeps every message.

    Only the system head and the window are walked (the window start is looked for from
    the end), so the request is built in the window's time, not the log's.
    """
    history = st.history
    head = system_head(history)
    start = window_index(st)
    if whole or start <= head or history[start].message.role != "user":
        messages, tokens, model_id = st.messages_for(taken)
        return Conversation(messages, tokens, model_id, start)
    kept = history[:head] + history[start:]
    tokens = {i: h.token_ids for i, h in enumerate(kept) if h.token_ids}
    model_id = next((h.model_id for h in reversed(kept) if h.model_id), None)
    messages = tuple(h.message for h in kept) + tuple(p.record.message for p in taken)
    return Conversation(
        messages, tokens, model_id, start, omitted=start - head,
        omitted_turns=sum(1 for h in history[head:start] if h.message.role == "user"),
    )


def window_index(st: SessionState) -> int:
    """Index in the history where the recorded window starts; 0 when it never moved."""
    if st.window_from is None:
        return 0
    return next(
        (i for i in range(len(st.history) - 1, -1, -1)
         if st.history[i].record_id == st.window_from), 0,
    )


def system_head(history: list[HistoryItem]) -> int:
    """How many leading system messages there are: they always stay in the window."""
    n = 0
    while n < len(history) and history[n].message.role == "system":
        n += 1
    return n
