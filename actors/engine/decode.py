"""One turn on one slot: prefix reuse, prefill, then decode with our own sampler.

Runs on the slot's worker thread. The cancel token is checked before every token, so an
abort stops generation within one token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from actors.engine.grammar import Constraint
from actors.engine.interface import Backend, CancelToken, end_of_generation
from actors.engine.sampling import Sampler, StopMatcher, Utf8Detokenizer
from actors.engine.slots import Slot
from actors.engine.speculation import Lookahead
from actors.engine.tokens import common_prefix
from schemas.chat import SamplingParams

FINISH_CHAR_TOKENS = 3
"""Most tokens generated past ``max_tokens`` to finish a character begun (a UTF-8 character
is at most 4 bytes; llama-cpp-python allows the same)."""


@dataclass
class DecodeResult:
    """Raw output of the decode loop."""

    raw_text: str
    finish_reason: str
    completion_ids: tuple[int, ...] | None
    completion_tokens: int
    prefill_ms: float
    decode_ms: float
    first_token_at: float | None
    stop_sequence: str | None = None
    """The stop string that ended the reply, if one did."""
    proposed_tokens: int = 0
    """Tokens speculation proposed (``actors/engine/speculation.py``)."""
    accepted_tokens: int = 0
    """Of those, tokens the sampler drew as proposed."""


def prefill(slot: Slot, tokens: Sequence[int]) -> tuple[int, float]:
    """Evaluate what ``slot`` lacks of ``tokens``; returns (reused tokens, ms)."""
    start = time.perf_counter()
    # At least the last prompt token is evaluated: its logits start the reply.
    reused = min(common_prefix(slot.tokens, tokens), len(tokens) - 1)
    slot.tokens = slot.tokens[:reused]
    slot.ctx.eval(tokens[reused:], reused)
    slot.tokens = list(tokens)
    return reused, (time.perf_counter() - start) * 1000


def decode(
    backend: Backend,
    slot: Slot,
    sampling: SamplingParams,
    stop: Sequence[str],
    max_tokens: int,
    emit: Callable[[str], None],
    cancel: CancelToken,
    constraint: Constraint | None = None,
    draft: int = 0,
) -> DecodeResult:
    """Generate until EOS, a stop string, ``max_tokens``, the context end, or cancel.

    Under a ``constraint`` only tokens its grammar allows are sampled, and the reply ends
    as soon as the grammar is complete. A reply never ends inside a character: cut by
    ``max_tokens`` with a character begun, up to ``FINISH_CHAR_TOKENS`` more tokens finish it
    (as llama-cpp-python does); otherwise its partial bytes are dropped, from the events and
    the text alike. The token that completes a stop string is counted in
    ``completion_tokens`` (it was generated) but, like the stop string, is not part of the
    reply or the slot's tokens. With ``draft`` > 0 and no constraint, up to that many tokens
    proposed by n-gram lookup are verified in each evaluation; the reply is the same.
    """
    start = time.perf_counter()
    sampler = Sampler(sampling, backend.eos_id, backend.n_vocab)
    detok = Utf8Detokenizer()
    stopper = StopMatcher(stop)
    parts: list[str] = []
    generated: list[int] = []
    first_at: float | None = None
    finish = "length"
    eog = end_of_generation(backend)
    ahead = Lookahead(slot.ctx, slot.tokens, draft if constraint is None else 0)
    while len(generated) < max_tokens or (
        detok.pending and len(generated) < max_tokens + FINISH_CHAR_TOKENS
    ):
        if cancel.cancelled:
            finish = "aborted"
            break
        if len(slot.tokens) >= slot.ctx.n_ctx:
            break
        token = _next_token(sampler, slot, sampling, eog, constraint, ahead)
        if first_at is None:
            first_at = time.perf_counter()
        if token in eog:
            finish = "stop"
            break
        if constraint is not None:
            constraint.consume(token)
        safe, stopped = stopper.feed(detok.feed(backend.piece(token)))
        if safe:
            parts.append(safe)
            emit(safe)
        if stopped:
            finish = "stop"
            break
        ahead.advance(token, len(slot.tokens), max_tokens - len(generated) - 1)
        slot.tokens.append(token)
        generated.append(token)
        if constraint is not None and constraint.complete:
            finish = "stop"
            break
    ahead.settle(len(slot.tokens))
    out = _finish(backend, detok, stopper, parts, emit, generated, finish, start, first_at)
    return replace(
        out, proposed_tokens=ahead.counts.proposed, accepted_tokens=ahead.counts.accepted
    )


def _next_token(
    sampler: Sampler,
    slot: Slot,
    sampling: SamplingParams,
    eog: frozenset[int],
    constraint: Constraint | None,
    ahead: Lookahead,
) -> int:
    recent = slot.tokens[-max(sampling.repeat_last_n, 1):]
    if len(eog) > 1:  # like EOS, end-of-turn markup recurs in every history: no penalty
        recent = [t for t in recent if t not in eog]
    logits = ahead.logits()
    if constraint is None:
        return sampler.sample(logits, recent)
    return sampler.sample(logits, recent, constraint.allowed())


def _finish(
    backend: Backend,
    detok: Utf8Detokenizer,
    stopper: StopMatcher,
    parts: list[str],
    emit: Callable[[str], None],
    generated: list[int],
    finish: str,
    start: float,
    first_at: float | None,
) -> DecodeResult:
    """Release held-back text (never a partial character) and describe the reply."""
    detok.drop_partial()
    if not stopper.stopped:
        tail = stopper.flush()
        if tail:
            parts.append(tail)
            emit(tail)
    raw = "".join(parts)
    ids = tuple(generated)
    # Only ids that spell the raw text exactly may stand in for it in the next prompt.
    spelled = b"".join(backend.piece(t) for t in ids).decode("utf-8", errors="replace")
    exact = spelled == raw
    return DecodeResult(
        raw_text=raw,
        finish_reason=finish,
        completion_ids=ids if exact else None,
        completion_tokens=len(generated) + (1 if stopper.stopped else 0),
        prefill_ms=0.0,
        decode_ms=(time.perf_counter() - start) * 1000,
        first_token_at=first_at,
        stop_sequence=stopper.matched,
    )
