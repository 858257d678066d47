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
the same order, and penalties see the same recent tokens, wherever the backend gives a
batch's positions the logits it gives lone tokens (llama.cpp's kernels may round a batch
differently, as they do a prefill: on a quantized model a near-tie can then go the other
way, the same as between a prompt prefilled and one decoded token by token). A rejected
proposal's cells are dropped from the KV cache by the next evaluation, which starts at the
first wrong position (``BackendContext.eval`` discards later positions), or by ``settle``
when the reply ends.

Grammar-constrained turns (JSON schema, forced tool calls) do not speculate: their tokens
come from a mask the grammar recomputes per token, and speculating through it would need
the matcher to roll back on every rejection.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np

from actors.engine.interface import BackendContext

MAX_DRAFT = 8
"""Most tokens proposed at once (``DraftPolicy`` proposes fewer where more do not pay)."""
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


_DECAY = 0.9
"""Weight of the past in the policy's moving averages (about the last ten samples count)."""
_EXPLORE_EVERY = 16
"""While proposing does not pay, one proposal in this many is still verified, so a change
(a reply that starts copying, a quieter machine) is seen."""


class DraftPolicy:
    """How many tokens to propose: the number that maximises expected tokens per second.

    Verifying ``k`` proposed tokens costs one evaluation of ``1 + k`` tokens, about
    ``t1 + k·extra``; it keeps ``1 + a + a² + … + a^k`` tokens on average, where ``a`` is the
    chance that a proposed token is drawn as proposed. A GPU evaluates 9 tokens for about
    the price of one (``extra`` ≈ 0: propose many); a CPU running a small quantized model
    one core at a time pays nearly 9 times (``extra`` ≈ ``t1``: propose only what is likely
    kept, or nothing). ``t1``, ``extra`` and ``a`` are moving averages of what this engine's
    evaluations took and kept, shared by its slots; until both costs are measured every
    proposal is verified whole. Decisions change only speed: the reply is the same.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._t1: float | None = None
        self._extra: float | None = None
        self._kept, self._seen = 1.0, 2.0  # a = 0.5 before any verification
        self._idle = 0

    def length(self, room: int) -> int:
        """Tokens to propose now, at most ``room``."""
        room = min(room, self.limit)
        if room <= 0 or self._t1 is None or self._extra is None:
            return room
        a, t1, extra = self._kept / self._seen, self._t1, max(self._extra, 0.0)
        best, best_rate, kept = 0, 1.0 / t1, 1.0
        for k in range(1, room + 1):
            kept += a**k
            if kept / (t1 + k * extra) > best_rate:
                best, best_rate = k, kept / (t1 + k * extra)
        if best == 0:
            self._idle += 1
            if self._idle % _EXPLORE_EVERY == 0:
                return min(room, 2)
        return best

    def timed(self, n_tokens: int, seconds: float) -> None:
        """An evaluation of ``n_tokens`` (one kept token and its proposal) took ``seconds``."""
        if n_tokens == 1:
            self._t1 = _mix(self._t1, seconds)
        elif self._t1 is not None:
            self._extra = _mix(self._extra, (seconds - self._t1) / (n_tokens - 1))

    def verified(self, examined: int, kept: int) -> None:
        """Of a proposal's first ``examined`` tokens, the first ``kept`` were drawn."""
        self._kept = self._kept * _DECAY + kept
        self._seen = self._seen * _DECAY + examined


def _mix(old: float | None, new: float) -> float:
    return new if old is None else old * _DECAY + new * (1 - _DECAY)


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

    def __init__(
        self, ctx: BackendContext, tokens: Sequence[int], policy: DraftPolicy | None
    ) -> None:
        self.ctx = ctx
        self.counts = SpeculationCounts()
        self._verifier = cast(Verifying, ctx) if policy and can_verify(ctx) else None
        self._policy = policy if self._verifier is not None else None
        self._proposer = NgramProposer(tokens, ctx.n_ctx) if self._policy else None
        self._logits: np.ndarray | None = None
        self._ahead: list[tuple[int, np.ndarray]] = []
        self._proposal = (0, 0)
        """Length of the proposal being verified, and its tokens drawn so far."""

    def logits(self) -> np.ndarray:
        """Logits for the token after those the slot holds."""
        return self._logits if self._logits is not None else self.ctx.logits()

    def advance(self, token: int, n_past: int, budget: int) -> None:
        """Make the KV cache hold ``token`` after the ``n_past`` tokens it holds; at most
        ``budget`` more tokens will be wanted after it."""
        if self._ahead and self._ahead[0][0] == token:
            self.counts.accepted += 1
            self._proposal = (self._proposal[0], self._proposal[1] + 1)
            self._logits = self._ahead.pop(0)[1]
            self._note(token)
            if not self._ahead:
                self._verified(0)
            return
        self._verified(1 if self._ahead else 0)
        self._ahead = []  # the evaluation below starts at n_past: it drops their cells
        self._note(token)
        drafts = self._propose(min(budget, self.ctx.n_ctx - n_past - 2))
        start = time.perf_counter()
        if not drafts or self._verifier is None:
            self._logits = None
            self.ctx.eval([token], n_past)
        else:
            rows = self._verifier.eval_all([token, *drafts], n_past)
            self.counts.proposed += len(drafts)
            self._logits = rows[0]
            self._ahead = list(zip(drafts, rows[1:], strict=True))
            self._proposal = (len(drafts), 0)
        if self._policy is not None:
            self._policy.timed(1 + len(drafts), time.perf_counter() - start)

    def _propose(self, room: int) -> list[int]:
        if self._proposer is None or self._policy is None:
            return []
        # The policy is asked only when there is a proposal: a step without one says nothing
        # about whether proposing pays.
        drafts = self._proposer.propose(room)
        return drafts[: self._policy.length(len(drafts))] if drafts else []

    def _verified(self, rejected: int) -> None:
        """The proposal being verified ended; ``rejected``: its next token was not drawn."""
        length, kept = self._proposal
        if length and self._policy is not None:
            self._policy.verified(kept + rejected, kept)
        self._proposal = (0, 0)

    def settle(self, n_past: int) -> None:
        """The reply ended with ``n_past`` tokens in the slot: drop the cells of proposed
        tokens never taken, so the KV cache holds exactly the slot's tokens."""
        if self._ahead and self._verifier is not None:
            self._verified(0)
            self._ahead = []
            self._logits = None
            self._verifier.discard(n_past)

    def _note(self, token: int) -> None:
        if self._proposer is not None:
            self._proposer.append(token)
