"""Whether a session takes a prompt: the ``expect_generation`` rule and the session's bounds.

Pure rules over the session's state; the runner asks them inside its mailbox, so the answer
and the recording that follows it are one step (no second prompt slips in between).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from actors.session.state import SessionState, message_bytes
from schemas.errors import ErrorCode, InferError
from schemas.messages import PromptRequest


@dataclass
class NodeBytes:
    """Bytes of messages all of the node's sessions hold, against one node-wide cap.

    ``held`` sums what the node's sessions recorded (so a deleted, dropped or handed-over
    session stops counting the moment its runner goes); ``reserved`` counts the prompts
    being recorded now, so concurrent admits to many sessions cannot all pass one check.
    """

    limit: int
    """Most bytes of messages the node's sessions may hold in all (busy 429 past it)."""
    held: Callable[[], int] = field(default=lambda: 0)
    """Bytes the node's sessions hold now."""
    reserved: int = 0
    """Bytes of prompts admitted and still being recorded."""

    def used(self) -> int:
        """Bytes held and reserved."""
        return self.held() + self.reserved


@dataclass(frozen=True)
class SessionLimits:
    """The bounds of one session."""

    max_pending: int
    """Messages that may wait for a turn (busy 429 past it)."""
    max_pending_bytes: int
    """Bytes of messages that may wait for a turn (busy 429 past it)."""
    max_session_bytes: int
    """Bytes of messages the session may record in all (too_large 413 past it)."""
    node: NodeBytes | None = None
    """The node-wide bound every session shares (busy 429 past it); None: unbounded."""


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
    if prompt.relay_from is not None and prompt.relay_from not in st.relay_grants:
        # The node relays with its own credentials: the target's grant is the authority.
        return InferError(
            ErrorCode.FORBIDDEN,
            f"session {st.session} does not accept relays from {prompt.relay_from}: a prompt "
            f"to {st.session} must first grant it with accept_relays_from",
            {"relay_from": prompt.relay_from},
        )
    grant_only = prompt.accept_relays_from is not None
    if not prompt.messages and not grant_only and not (prompt.reply and st.has_deferred()):
        return InferError(
            ErrorCode.BAD_REQUEST,
            "the prompt has no messages and no aborted turn waits for a retry; send at "
            "least one message",
        )
    return None


def key_conflict(
    st: SessionState, key: str, prompt: PromptRequest, ask: bool = False
) -> InferError | None:
    """A conflict when ``key`` was recorded for a different prompt, or for an ``ask`` (the
    first ask gets the answer); None for a true retry of a prompt."""
    if ask:
        return InferError(
            ErrorCode.CONFLICT,
            f"an ask with idempotency key {key!r} was already accepted; its answer goes to "
            f"that ask and is in the history of session {st.session}",
            {"idempotency_key": key},
        )
    first = st.key_digests.get(key)
    if first is None or first == prompt.digest():
        return None
    return InferError(
        ErrorCode.CONFLICT,
        f"idempotency key {key!r} was already used in session {st.session} for a different "
        "prompt; nothing was recorded: use a new key for a new prompt",
        {"idempotency_key": key},
    )


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
    size = prompt_bytes(prompt)
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
    return _node_bound(limits.node, size)


def _node_bound(node: NodeBytes | None, size: int) -> InferError | None:
    if node is None or not size:
        return None
    used = node.used()
    if used + size <= node.limit:
        return None
    return InferError(
        ErrorCode.BUSY,
        f"the node's sessions hold {used} bytes of messages and this prompt adds {size}; "
        f"the node holds at most {node.limit} (--max-node-bytes): retry later, or delete "
        "sessions you no longer need",
        {"node_bytes": used, "adds": size, "limit": node.limit, "retry_after_s": 5},
    )


def prompt_bytes(prompt: PromptRequest) -> int:
    """Bytes of messages a prompt adds to its session."""
    return sum(message_bytes(m) for m in prompt.messages)
