"""Chunked prefill on the tiny model: a cancel stops a long prefill within one chunk and
leaves the slot consistent, other sessions keep decoding between its chunks, and a long
prefill reports its progress."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from actors.engine import decode as decode_mod
from actors.engine.backends.llamacpp.backend import llama_cpp_available
from actors.engine.engine import SlotEngine
from actors.engine.interface import CancelToken, PrefillProgress, TurnOutcome, TurnSpec
from actors.engine.loader import load_engine
from node.config import NodeConfig
from schemas.chat import ChatMessage, SamplingParams
from schemas.records import ReplyParams
from tests.helpers import until

GREEDY = SamplingParams(temperature=0.0)
CHUNK = 64
NEEDS_LLAMA_CPP = pytest.mark.skipif(
    not llama_cpp_available(),
    reason="llama-cpp-python is not installed (pip install 'infernode[llamacpp]')",
)


@pytest.fixture(params=["ctransformers", pytest.param("llama-cpp", marks=NEEDS_LLAMA_CPP)])
def engine_name(request: pytest.FixtureRequest) -> str:
    """The engine a test runs on."""
    return str(request.param)


@pytest.fixture
async def make_engine(tiny_model: Path) -> AsyncIterator[Callable[..., SlotEngine]]:
    """Load engines on the tiny model; all are closed after the test."""
    made: list[SlotEngine] = []

    def make(engine: str, **kw: Any) -> SlotEngine:
        config = NodeConfig(model=tiny_model, engine=engine, threads=1, verify_restore=False,
                            bank_ram_bytes=0, speculate="off", n_ctx=4096, **kw)
        made.append(load_engine(config))
        return made[-1]

    yield make
    for engine in made:
        await engine.close()


def long_spec(session: str, words: int, max_tokens: int = 4) -> TurnSpec:
    text = " ".join(f"word{i % 97}" for i in range(words))
    return TurnSpec(
        session=session,
        turn_id=f"{session}-t",
        messages=(ChatMessage(role="user", content=text),),
        params=ReplyParams(sampling=GREEDY, max_tokens=max_tokens),
    )


def count_evaluations(engine: SlotEngine, name: str, seen: Callable[[int], None]) -> None:
    """Call ``seen(n)`` after each library evaluation of ``n`` tokens, on either engine."""
    ctx = engine.pool.slots[0].ctx
    if name == "llama-cpp":
        shared = ctx.shared  # type: ignore[attr-defined]
        evaluate = shared.evaluate

        def spy_llama(seq: int, tokens: Any, *args: Any, **kw: Any) -> Any:
            rows = evaluate(seq, tokens, *args, **kw)
            seen(len(tokens))
            return rows

        shared.evaluate = spy_llama
        return
    lib = ctx.lib  # type: ignore[attr-defined]
    llama_eval = lib.llama_eval

    class Spy:  # the context calls ``self.lib.llama_eval``; the rest passes through
        def __getattr__(self, attr: str) -> Any:
            return getattr(lib, attr)

        def llama_eval(self, handle: Any, arr: Any, n: int, *rest: Any) -> int:
            rc = int(llama_eval(handle, arr, n, *rest))
            seen(n)
            return rc

    ctx.lib = Spy()  # type: ignore[attr-defined]


async def run(engine: SlotEngine, spec: TurnSpec, cancel: CancelToken | None = None,
              emit: Callable[[str], None] | None = None, **kw: Any) -> TurnOutcome:
    return await engine.run_turn(spec, emit or (lambda _t: None), cancel or CancelToken(), **kw)


async def test_a_cancel_during_a_long_prefill_stops_it_within_one_chunk(
    make_engine, engine_name
):
    """A cancel that lands after the first chunk of a long prompt stops the prefill before
    another chunk's worth is evaluated; the turn ends aborted with no reply, and the slot
    holds exactly the evaluated prefix, which the next turn reuses for the same answer."""
    engine = make_engine(engine_name, n_slots=2, n_batch=CHUNK)
    spec = long_spec("a", 300)
    total = len(engine.prompt_tokens(spec))
    assert total > 10 * CHUNK
    cancel = CancelToken()
    counts = {"before": 0, "after": 0}

    def seen(n: int) -> None:  # on the worker thread
        counts["after" if cancel.cancelled else "before"] += n
        cancel.cancel("client")

    count_evaluations(engine, engine_name, seen)
    out = await run(engine, spec, cancel)
    assert out.finish_reason == "aborted" and out.raw_text == ""
    assert out.usage.completion_tokens == 0
    assert counts["after"] < CHUNK, counts
    slot = engine.pool.resident("a")
    assert slot is not None and slot.tokens == engine.prompt_tokens(spec)[: len(slot.tokens)]
    assert len(slot.tokens) == counts["before"] + counts["after"]
    held = len(slot.tokens)
    again = await run(engine, spec)
    assert again.usage.cached_tokens == held and again.cache.source == "slot"
    fresh = await run(engine, long_spec("b", 300))
    assert again.completion_ids == fresh.completion_ids


@NEEDS_LLAMA_CPP
async def test_another_sessions_tokens_keep_coming_during_a_long_prefill(
    make_engine, monkeypatch
):
    """While one session prefills a long prompt, another's decode steps run between its
    chunks: it gets a token per small chunk, not one per ``n_batch`` of the prompt."""
    # The tiny model evaluates n_batch tokens within any step budget: ask for the smallest.
    monkeypatch.setattr(decode_mod, "STEP_BUDGET_S", 0.0)
    engine = make_engine("llama-cpp", n_slots=2, n_batch=512)
    decoding = CancelToken()
    stamps: list[float] = []
    started = threading.Event()

    def on_token(_text: str) -> None:
        stamps.append(time.perf_counter())
        started.set()

    other = engine_task(engine, long_spec("b", 4, max_tokens=100_000), decoding, on_token)
    await until(started.is_set, 30, "the other session's first token")
    first: list[float] = []
    begin = time.perf_counter()
    spec = long_spec("a", 400)
    out = await run(engine, spec, emit=lambda _t: first.append(time.perf_counter()))
    decoding.cancel("client")
    await other
    assert first, "the long prompt's turn produced no token"
    during = [t for t in stamps if begin <= t <= first[0]]
    evaluated = out.usage.new_prefill_tokens
    assert evaluated > 3 * 512
    # One step per chunk, and the other session has a token in every step.
    assert len(during) >= evaluated / decode_mod.MIN_CHUNK / 2, (len(during), evaluated)


def test_a_shared_chunk_is_sized_to_the_step_budget_from_the_measured_pace(monkeypatch):
    """Alone, a chunk is n_batch; beside a busy slot, what the last chunk's pace evaluates in
    the step budget, never below MIN_CHUNK nor above n_batch."""
    clock = iter([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    monkeypatch.setattr(decode_mod.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(decode_mod, "STEP_BUDGET_S", 0.05)
    shared = [False, True, True, True, True, True]
    size = decode_mod.ChunkSize(512, lambda: shared.pop(0))
    assert size() == 512  # alone
    assert size() == 256  # 512 tokens took 0.1 s: 5,120 tok/s, 256 in 0.05 s
    assert size() == 128  # 256 in 0.1 s
    assert size() == 64
    assert size() == decode_mod.MIN_CHUNK  # 640 tok/s would give 32; the floor holds
    monkeypatch.setattr(decode_mod, "STEP_BUDGET_S", 10.0)
    assert size() == 512


async def test_a_long_prefill_reports_its_progress_and_a_short_one_does_not(
    make_engine, engine_name, monkeypatch
):
    """With reports due after every chunk, a long prefill reports growing ``done`` counts
    below the total (never the finished prompt, which its first token shows)."""
    monkeypatch.setattr(decode_mod, "PROGRESS_EVERY_S", 0.0)
    engine = make_engine(engine_name, n_slots=1, n_batch=CHUNK)
    steps: list[PrefillProgress] = []
    spec = long_spec("a", 150)
    total = len(engine.prompt_tokens(spec))
    await run(engine, spec, progress=steps.append)
    assert len(steps) == -(-total // CHUNK) - 1
    assert [s.done for s in steps] == [CHUNK * (i + 1) for i in range(len(steps))]
    assert all(s.total == total and s.cached == 0 for s in steps)
    monkeypatch.setattr(decode_mod, "PROGRESS_EVERY_S", 60.0)
    quiet: list[PrefillProgress] = []
    await run(engine, long_spec("b", 150), progress=quiet.append)
    assert quiet == []


def engine_task(engine: SlotEngine, spec: TurnSpec, cancel: CancelToken,
                emit: Callable[[str], None]) -> asyncio.Future[TurnOutcome]:
    return asyncio.ensure_future(run(engine, spec, cancel, emit))
