"""Whether a session takes a prompt: the ``expect_generation`` rule and the session's bounds.

Pure rules over the session's state; the runner asks them inside its mailbox, so the answer
and the recording that follows it are one step (no second prompt slips in between).
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.session.state import SessionState, message_bytes
from schemas.errors import ErrorCode, InferError
from schemas.messages import PromptRequest


@dataclass(frozen=True)
class SessionLimits:
    """The bounds of one session."""

    max_pending: int
    """Messages that may wait for a turn (busy 429 past it)."""
    max_pending_bytes: int
    """Bytes of messages that may wait for a turn (busy 429 past it)."""
    max_session_bytes: int
    """Bytes of messages the session may record in all (too_large 413 past it)."""


def refusal(
    st: SessionState, prompt: PromptRequest, turn_running: bool, limits: SessionLimits
) -> InferError | None:
    """Why ``prompt`` may not be recorded now; None when it may."""
    if prompt.expect_generation is not None:
        conflict = generation_conflict(st, prompt.expect_generation, turn_running)
        if conflict is not None:
            return conflict
    if len(st.pending) + len(prompt.messages) > limits.max_pending:
        return InferError(
            ErrorCode.BUSY,
            f"session {st.session} already has {len(st.pending)} messages waiting; "
            "retry after its current turn",
            {"pending": len(st.pending)},
        )
    bound = _byte_bound(st, prompt, limits)
    if bound is not None:
        return bound
    if not prompt.messages and not (prompt.reply and st.has_deferred()):
        return InferError(
            ErrorCode.BAD_REQUEST,
            "the prompt has no messages and no aborted turn waits for a retry; send at "
            "least one message",
        )
    return None


def generation_conflict(st: SessionState, expected: int, turn_running: bool) -> InferError | None:
    """The ``expect_generation`` rule: admitted only at that generation with no answer on its
    way (no turn running, no prompt waiting for one). So of writers expecting one generation
    the first recorded wins, and the others hear that the session moved on."""
    if expected == st.generation and not turn_running and not st.wants_turn():
        return None
    sentence = f"session {st.session} is at generation {st.generation}"
    if expected == st.generation:
        sentence += (
            " but a turn is already answering it; nothing was recorded: read that answer, "
            f"then expect generation {st.generation + 1}"
        )
    else:
        sentence += f", not {expected}; nothing was recorded"
    return InferError(
        ErrorCode.CONFLICT, sentence, {"generation": st.generation, "expected": expected}
    )


def _byte_bound(
    st: SessionState, prompt: PromptRequest, limits: SessionLimits
) -> InferError | None:
    size = sum(message_bytes(m) for m in prompt.messages)
    if st.recorded_bytes + size > limits.max_session_bytes:
        return InferError(
            ErrorCode.TOO_LARGE,
            f"session {st.session} holds {st.recorded_bytes} bytes of messages and this "
            f"prompt adds {size}; a session holds at most {limits.max_session_bytes} "
            "(--max-session-bytes): continue in a new session, or delete this one",
            {"bytes": st.recorded_bytes, "adds": size, "limit": limits.max_session_bytes},
        )
    waiting = st.pending_bytes()
    if waiting + size > limits.max_pending_bytes:
        return InferError(
            ErrorCode.BUSY,
            f"session {st.session} already has {waiting} bytes waiting and this prompt "
            f"adds {size}; at most {limits.max_pending_bytes} may wait "
            "(--max-pending-bytes): retry after its current turn",
            {"pending_bytes": waiting, "adds": size, "limit": limits.max_pending_bytes},
        )
    return None
