"""One turn on one slot: prefix reuse, prefill, then decode with our own sampler.

Runs on the slot's worker thread. The cancel token is checked before every token, so an
abort stops generation within one token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from actors.engine.grammar import Constraint
from actors.engine.interface import Backend, CancelToken, end_of_generation
from actors.engine.sampling import Sampler, StopMatcher, Utf8Detokenizer
from actors.engine.slots import Slot
from actors.engine.tokens import common_prefix
from schemas.chat import SamplingParams


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
) -> DecodeResult:
    """Generate until EOS, a stop string, ``max_tokens``, the context end, or cancel.

    Under a ``constraint`` only tokens its grammar allows are sampled, and the reply ends
    as soon as the grammar is complete.
    """
    start = time.perf_counter()
    sampler = Sampler(sampling, backend.eos_id, backend.n_vocab)
    detok = Utf8Detokenizer()
    stopper = StopMatcher(stop)
    parts: list[str] = []
    generated: list[int] = []
    first_at: float | None = None
    finish = "length"
    last_n = max(sampling.repeat_last_n, 1)
    eog = end_of_generation(backend)
    for _ in range(max_tokens):
        if cancel.cancelled:
            finish = "aborted"
            break
        if len(slot.tokens) >= slot.ctx.n_ctx:
            break
        recent = slot.tokens[-last_n:]
        if len(eog) > 1:  # like EOS, end-of-turn markup recurs in every history: no penalty
            recent = [t for t in recent if t not in eog]
        logits = slot.ctx.logits()
        if constraint is None:
            token = sampler.sample(logits, recent)
        else:
            token = sampler.sample(logits, recent, constraint.allowed())
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
        slot.ctx.eval([token], len(slot.tokens))
        slot.tokens.append(token)
        generated.append(token)
        if constraint is not None and constraint.complete:
            finish = "stop"
            break
    if finish != "stop" or not stopper.stopped:
        tail, _ = stopper.feed(detok.flush())
        tail += stopper.flush()
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
        completion_tokens=len(generated),
        prefill_ms=0.0,
        decode_ms=(time.perf_counter() - start) * 1000,
        first_token_at=first_at,
    )
