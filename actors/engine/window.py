"""The context window of a session: which whole turns of its history the model still sees.

The record log keeps every message; the window is a view over it. With the ``truncate``
policy the oldest whole turns go first — a turn is a user message with everything that
answers it (assistant replies, tool calls and their results) — while the leading system
messages, the tool set (it lives in the system part of the template) and the newest turn
always stay. A tool call and its result are in one turn, so they are never split. What the
request ends with — its trailing user and tool messages, such as an agent's summary of the
work so far followed by its new question — is what the client just sent: it stays whole, and
when it cannot fit the turn is a context overflow rather than an answer to part of it.

When the window has to move, it moves further than the bare minimum (to half of what the
context holds for the prompt), and it stays where it is while the conversation still fits:
consecutive turns then render the same prefix, so their KV state is reused from the slot or
the bank instead of being evaluated again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from actors.engine.slots import Slot
from actors.engine.tokens import common_prefix
from schemas.chat import ChatMessage

PROBE_TOKENS = 8
"""Tokens of the new prompt, right after the common prefix, looked for further on in the slot
to find where the kept part of a moved window begins."""
KEEP_FRACTION = 0.5
"""Share of the prompt budget a moved window fills, leaving room for the turns that follow."""


@dataclass(frozen=True)
class Window:
    """Where a session's window starts, and what it has dropped so far."""

    start: int = 0
    """Index of the first kept message after the leading system messages."""
    dropped_turns: int = 0
    """Whole turns left out of the window."""
    dropped_messages: int = 0
    """Messages left out of the window."""
    dropped_tokens: int = 0
    """Prompt tokens those messages took when they last were in the window."""


def turn_starts(messages: Sequence[ChatMessage]) -> list[int]:
    """Index of every user message that starts a turn (after the leading system messages)."""
    head = system_head(messages)
    return [i for i in range(head, len(messages)) if messages[i].role == "user"]


def sent_tail(messages: Sequence[ChatMessage]) -> int:
    """Index of the first of the user and tool messages the conversation ends with."""
    n = len(messages)
    while n > 0 and messages[n - 1].role in ("user", "tool"):
        n -= 1
    return n


def system_head(messages: Sequence[ChatMessage]) -> int:
    """How many leading system messages there are: they always stay in the window."""
    n = 0
    while n < len(messages) and messages[n].role == "system":
        n += 1
    return n


def recorded(messages: Sequence[ChatMessage], start: int) -> Window:
    """The window starting at ``start``, as the session's record log names it.

    A node that did not move this window itself (the session moved here, or the node
    restarted) knows what it leaves out but not how many tokens that took: ``dropped_tokens``
    counts only what it drops from here on.
    """
    head = system_head(messages)
    dropped = messages[head : max(start, head)]
    return Window(
        start=start, dropped_turns=sum(1 for m in dropped if m.role == "user"),
        dropped_messages=len(dropped),
    )


def view(
    messages: Sequence[ChatMessage], tokens: Mapping[int, tuple[int, ...]], start: int
) -> tuple[tuple[ChatMessage, ...], dict[int, tuple[int, ...]]]:
    """The messages from ``start`` on, after the system head, with their token ids re-indexed."""
    head = system_head(messages)
    keep = list(range(head)) + list(range(max(start, head), len(messages)))
    kept = tuple(messages[i] for i in keep)
    ids = {new: tokens[old] for new, old in enumerate(keep) if old in tokens}
    return kept, ids


def slide(
    messages: Sequence[ChatMessage],
    current: Window,
    measure: Callable[[int], int],
    budget: int,
) -> tuple[Window, int]:
    """The window for this turn and its prompt length in tokens.

    ``measure(start)`` is the prompt length with the window starting at ``start``; ``budget``
    is how many prompt tokens fit beside the reply. The window stays at ``current.start``
    when that fits; otherwise it moves to the first turn start that fills at most
    ``KEEP_FRACTION`` of the budget, or to the newest turn when nothing smaller fits.
    """
    head = system_head(messages)
    if current.start > head and (
        current.start >= len(messages) or messages[current.start].role != "user"
    ):  # not this conversation's window (the session was rebuilt): start over
        current = Window()
    start = max(current.start, head)
    length = measure(start)
    if length <= budget:
        return current, length
    tail = sent_tail(messages)
    starts = [s for s in turn_starts(messages) if start < s <= tail]
    if not starts:  # only the newest turn is left: it cannot be cut
        return current, length
    target = int(budget * KEEP_FRACTION)
    lo, hi = 0, len(starts) - 1  # the least dropped start whose prompt fits the target
    lengths: dict[int, int] = {}
    while lo < hi:
        mid = (lo + hi) // 2
        lengths[mid] = measure(starts[mid])
        if lengths[mid] <= target:
            hi = mid
        else:
            lo = mid + 1
    new = starts[lo]
    new_length = lengths[lo] if lo in lengths else measure(new)
    dropped = messages[start:new]
    moved = Window(
        start=new,
        dropped_turns=current.dropped_turns + sum(1 for m in dropped if m.role == "user"),
        dropped_messages=current.dropped_messages + len(dropped),
        dropped_tokens=current.dropped_tokens + max(0, length - new_length),
    )
    return moved, new_length


def shift_kept(slot: Slot, tokens: list[int]) -> int:
    """Where the window moved, drop the left-out cells and shift the kept ones down.

    Finds the kept part of the slot (the new prompt after its common prefix, further on in
    the slot) and asks the context to remove the cells in between and move the rest to
    their new positions, so the prefill that follows reuses them. Returns how many cells
    were removed: 0 when nothing was found or the context cannot shift (ctransformers' build
    has no such call: there the window is recomputed from the common prefix, as truncate).
    """
    shift = getattr(slot.ctx, "shift", None)
    p = common_prefix(slot.tokens, tokens)
    have, rest = slot.tokens, tokens[p:]
    if shift is None or len(rest) < PROBE_TOKENS:
        return 0
    # Questions of one session often start alike: the kept part is where the longest run of
    # the new prompt continues, not the first place its opening tokens appear.
    gap, best = 0, PROBE_TOKENS - 1
    for d in range(1, len(have) - p - PROBE_TOKENS + 1):
        if have[p + d] == rest[0]:
            run = common_prefix(have[p + d :], rest)
            if run > best:
                gap, best = d, run
    if not gap or not shift(p, p + gap):
        return 0
    slot.tokens = have[:p] + have[p + gap :]
    return gap
