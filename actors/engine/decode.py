"""One turn on one slot: prefix reuse, prefill, then decode with our own sampler.

Runs on the slot's worker thread. The prompt is evaluated in chunks and the cancel token is
checked before every chunk and every token, so an abort stops a prefill within one chunk and
generation within one token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from actors.engine.grammar import Constraint
from actors.engine.interface import Backend, CancelToken, PrefillProgress, end_of_generation
from actors.engine.sampling import Sampler, StopMatcher, Utf8Detokenizer
from actors.engine.slots import Slot
from actors.engine.speculation import DraftPolicy, Lookahead
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


PROGRESS_EVERY_S = 2.0
"""How often a long prefill reports how far it got: a client with an idle timeout sees the
turn alive (llama-server sends ``prompt_progress`` for the same reason)."""


class ProgressClock:
    """Passes a prefill's progress on, at most once every ``PROGRESS_EVERY_S`` (never for a
    prefill shorter than that)."""

    def __init__(self, report: Callable[[PrefillProgress], None], total: int) -> None:
        self._report = report
        self._total = total
        self._start = self._last = time.perf_counter()

    def __call__(self, reused: int, done: int) -> None:
        """Called after each chunk: tokens reused, and the prompt tokens the slot holds."""
        now = time.perf_counter()
        if done >= self._total or now - self._last < PROGRESS_EVERY_S:
            return
        self._last = now
        self._report(PrefillProgress(
            done=done, total=self._total, cached=reused, elapsed_ms=(now - self._start) * 1000,
        ))


STEP_BUDGET_S = 0.1
"""How long one prefill chunk may hold the other slots' next tokens: while another slot is
busy, a chunk is sized from the prefill's measured pace to take about this long (on a CPU
about a hundred tokens, on a GPU a whole ``n_batch``)."""
MIN_CHUNK = 64
"""Fewest tokens of a shared chunk: every step pays a fixed cost (a pass over the weights
per micro-batch), which smaller chunks would multiply."""


class ChunkSize:
    """Tokens of the next prefill chunk: ``n_batch`` while the slot runs alone; while
    ``shared()`` says another slot is busy, what the pace of the latest chunk evaluates in
    ``STEP_BUDGET_S``, between ``MIN_CHUNK`` and ``n_batch``."""

    def __init__(self, n_batch: int, shared: Callable[[], bool]) -> None:
        self._n_batch = n_batch
        self._shared = shared
        self._last: tuple[float, int] | None = None
        self._pace: float | None = None
        """Tokens per second of the latest chunk (with what rode in its steps)."""

    def __call__(self) -> int:
        """Called before each chunk: the time since the last call is that chunk's."""
        now = time.perf_counter()
        if self._last is not None:
            self._pace = self._last[1] / max(now - self._last[0], 1e-6)
        size = self._n_batch
        if self._shared():
            guess = 2 * MIN_CHUNK if self._pace is None else int(self._pace * STEP_BUDGET_S)
            size = max(MIN_CHUNK, min(self._n_batch, guess))
        self._last = (now, size)
        return size


@dataclass(frozen=True)
class Prefilled:
    """What a prefill did."""

    reused: int
    """Prompt tokens the slot already held."""
    evaluated: int
    """Prompt tokens evaluated now."""
    ms: float
    complete: bool
    """False when a cancel stopped it: the slot holds the prompt's first ``reused +
    evaluated`` tokens, a prefix the next turn of the session reuses."""


def prefill(
    slot: Slot,
    tokens: Sequence[int],
    cancel: CancelToken | None = None,
    chunk: Callable[[], int] = lambda: 512,
    report: Callable[[int, int], None] | None = None,
) -> Prefilled:
    """Evaluate what ``slot`` lacks of ``tokens``, ``chunk()`` tokens at a time.

    ``chunk`` is asked before every chunk (the engine shrinks it while other slots decode);
    ``report`` gets the tokens reused and the prompt tokens the slot holds after each.
    ``slot.tokens`` always names exactly the cells evaluated, so a prefill stopped by
    ``cancel`` between chunks leaves a state as consistent as a finished one.
    """
    start = time.perf_counter()
    # At least the last prompt token is evaluated: its logits start the reply.
    reused = min(common_prefix(slot.tokens, tokens), len(tokens) - 1)
    slot.tokens = slot.tokens[:reused]
    done = reused
    while done < len(tokens):
        if cancel is not None and cancel.cancelled:
            break
        part = tokens[done : done + max(1, chunk())]
        slot.ctx.eval(part, done)
        done += len(part)
        slot.tokens.extend(part)
        if report is not None:
            report(reused, done)
    ms = (time.perf_counter() - start) * 1000
    return Prefilled(reused, done - reused, ms, done == len(tokens))


def decode(
    backend: Backend,
    slot: Slot,
    sampling: SamplingParams,
    stop: Sequence[str],
    max_tokens: int,
    emit: Callable[[str], None],
    cancel: CancelToken,
    constraint: Constraint | None = None,
    speculation: DraftPolicy | None = None,
) -> DecodeResult:
    """Generate until EOS, a stop string, ``max_tokens``, the context end, or cancel.

    Under a ``constraint`` only tokens its grammar allows are sampled, and the reply ends
    as soon as the grammar is complete. A reply never ends inside a character: cut by
    ``max_tokens`` with a character begun, up to ``FINISH_CHAR_TOKENS`` more tokens finish it
    (as llama-cpp-python does); otherwise its partial bytes are dropped, from the events and
    the text alike. The token that completes a stop string is counted in
    ``completion_tokens`` (it was generated) but, like the stop string, is not part of the
    reply or the slot's tokens. With a ``speculation`` policy and no constraint, tokens
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
    ahead = Lookahead(slot.ctx, slot.tokens, speculation if constraint is None else None)
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
