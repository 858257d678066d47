"""Speculative decoding without a draft model: n-gram (prompt lookup) proposals, verified in
one batch by our own sampler.

Agents repeat code and text from their context. When the last few tokens of the slot
(prompt and reply so far) occurred earlier, the tokens that followed them then are a good
guess for what follows now. ``NgramProposer`` finds the longest such suffix match and
proposes up to ``MAX_DRAFT`` following tokens; ``Lookahead`` evaluates the sampled token and
the proposal in one backend call that returns every position's logits, and holds those
logits for the decode loop.

Verification is the decode loop itself: each next token is still drawn by ``Sampler`` from
the logits of its own position, and a proposed token is accepted exactly when the draw
equals it. For a proposal treated as a point mass this is standard speculative sampling:
the draft ``t`` is accepted with probability p(t), and when it is not the drawn token is
distributed as p with ``t`` removed, renormalised. So greedy output is token-for-token what
decoding without speculation gives, a seeded sampled reply draws the same random numbers in
the same order, and penalties see the same recent tokens. A rejected proposal's cells are
dropped from the KV cache by the next evaluation, which starts at the first wrong position
(``BackendContext.eval`` discards later positions), or by ``settle`` when the reply ends.

Grammar-constrained turns (JSON schema, forced tool calls) do not speculate: their tokens
come from a mask the grammar recomputes per token, and speculating through it would need
the matcher to roll back on every rejection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np

from actors.engine.interface import BackendContext

MAX_DRAFT = 8
"""Most tokens proposed at once: a batch of 9 costs a CPU little more than one token, and
agents' repeated spans are rarely cut short before that."""
MIN_MATCH = 2
"""Shortest suffix match that proposes: a lone recurring token (a space, a newline) predicts
too little to pay for the wider batch."""
MAX_MATCH = 16
"""Longest suffix looked for: longer matches pick the same continuation."""


class Verifying(Protocol):
    """A context that can evaluate tokens returning every position's logits."""

    n_ctx: int

    def eval(self, tokens: Sequence[int], n_past: int) -> None:
        """Evaluate ``tokens`` at ``n_past``…; later positions are discarded."""

    def logits(self) -> np.ndarray:
        """Logits after the last evaluated token."""

    def eval_all(self, tokens: Sequence[int], n_past: int) -> np.ndarray:
        """Evaluate ``tokens`` at ``n_past``… in one batch; logits of every position
        (``len(tokens)`` × n_vocab). Later positions are discarded."""

    def discard(self, n_past: int) -> None:
        """Drop every cell from position ``n_past`` on."""


def can_verify(ctx: BackendContext) -> bool:
    """Whether ``ctx`` evaluates a batch returning all its logits (the llama-cpp engine's
    sequences do; ctransformers' 2023 contexts keep only the last token's)."""
    return callable(getattr(ctx, "eval_all", None)) and callable(getattr(ctx, "discard", None))


class NgramProposer:
    """The slot's tokens, and what followed the latest earlier occurrence of their suffix."""

    def __init__(self, tokens: Sequence[int], capacity: int) -> None:
        self._ids = np.zeros(max(capacity, len(tokens) + 1), dtype=np.int64)
        self._ids[: len(tokens)] = tokens
        self._n = len(tokens)

    def append(self, token: int) -> None:
        """One more token at the end."""
        if self._n == self._ids.size:
            self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
        self._ids[self._n] = token
        self._n += 1

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest earlier match of the tokens' suffix
        (at least ``MIN_MATCH`` long); the most recent such match with ``k`` tokens after it,
        else the one with the most."""
        ids, n = self._ids, self._n
        if k <= 0 or n <= MIN_MATCH:
            return []
        starts = np.flatnonzero(ids[: n - 1] == ids[n - 1])  # where a match's last token is
        length = 1
        while starts.size and length < MAX_MATCH:
            back = starts - length
            longer = starts[(back >= 0) & (ids[np.maximum(back, 0)] == ids[n - 1 - length])]
            if not longer.size:
                break
            starts, length = longer, length + 1
        if length < MIN_MATCH or not starts.size:
            return []
        whole = starts[starts + k < n]
        at = int(whole[-1]) if whole.size else int(starts[0])
        return [int(t) for t in ids[at + 1 : min(at + 1 + k, n)]]


@dataclass
class SpeculationCounts:
    """Proposed and accepted tokens of one reply."""

    proposed: int = 0
    accepted: int = 0


class Lookahead:
    """The next-token logits of a decoding slot, with proposed tokens evaluated past its end.

    ``advance`` replaces evaluating each kept token alone: a token that was proposed is
    already in the KV cache (its logits are taken from the batch); any other is evaluated,
    with a fresh proposal after it when one is found. Without ``draft`` (speculation off,
    a grammar, or a context that cannot verify) it evaluates one token at a time.
    """

    def __init__(self, ctx: BackendContext, tokens: Sequence[int], draft: int) -> None:
        self.ctx = ctx
        self.counts = SpeculationCounts()
        self._verifier = cast(Verifying, ctx) if draft and can_verify(ctx) else None
        self._draft = draft if self._verifier is not None else 0
        self._proposer = NgramProposer(tokens, ctx.n_ctx) if self._draft else None
        self._logits: np.ndarray | None = None
        self._ahead: list[tuple[int, np.ndarray]] = []

    def logits(self) -> np.ndarray:
        """Logits for the token after those the slot holds."""
        return self._logits if self._logits is not None else self.ctx.logits()

    def advance(self, token: int, n_past: int, budget: int) -> None:
        """Make the KV cache hold ``token`` after the ``n_past`` tokens it holds; at most
        ``budget`` more tokens will be wanted after it."""
        if self._ahead and self._ahead[0][0] == token:
            self.counts.accepted += 1
            self._logits = self._ahead.pop(0)[1]
            self._note(token)
            return
        self._ahead = []  # the evaluation below starts at n_past: it drops their cells
        self._note(token)
        room = min(self._draft, budget, self.ctx.n_ctx - n_past - 2)
        drafts = self._proposer.propose(room) if self._proposer is not None else []
        if not drafts or self._verifier is None:
            self._logits = None
            self.ctx.eval([token], n_past)
            return
        rows = self._verifier.eval_all([token, *drafts], n_past)
        self.counts.proposed += len(drafts)
        self._logits = rows[0]
        self._ahead = list(zip(drafts, rows[1:], strict=True))

    def settle(self, n_past: int) -> None:
        """The reply ended with ``n_past`` tokens in the slot: drop the cells of proposed
        tokens never taken, so the KV cache holds exactly the slot's tokens."""
        if self._ahead and self._verifier is not None:
            self._ahead = []
            self._logits = None
            self._verifier.discard(n_past)

    def _note(self, token: int) -> None:
        if self._proposer is not None:
            self._proposer.append(token)
