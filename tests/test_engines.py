"""Behaviour every engine owes the node, run against each engine on the tiny model.

The llama-cpp engine is an optional extra; its cases skip, saying so, where it is not
installed. Engine selection (``--engine auto``) is tested here too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from actors.engine import loader as loader_mod
from actors.engine import sampling as sampling_mod
from actors.engine.backends.llamacpp.backend import llama_cpp_available
from actors.engine.backends.params import LlamaLibraryError, ModelLoadError
from actors.engine.engine import SlotEngine
from actors.engine.gguf_info import UnsupportedModelError, read_gguf_info
from actors.engine.interface import CancelToken, TurnOutcome, TurnSpec, end_of_generation
from actors.engine.loader import (
    LlamaCppMissingError,
    choose_engine,
    default_threads,
    load_engine,
)
from node.client import InfernodeClient, TurnResult
from node.config import NodeConfig
from schemas.chat import ChatMessage, SamplingParams
from schemas.errors import ErrorCode, InferError
from schemas.records import ReplyParams
from tests.helpers import until

GREEDY = SamplingParams(temperature=0.0)
NEEDS_LLAMA_CPP = pytest.mark.skipif(
    not llama_cpp_available(),
    reason="llama-cpp-python is not installed (pip install 'infernode[llamacpp]')",
)
MakeEngine = Callable[..., SlotEngine]


@pytest.fixture(params=["ctransformers", pytest.param("llama-cpp", marks=NEEDS_LLAMA_CPP)])
def engine(request: pytest.FixtureRequest) -> str:
    """The engine a test runs on."""
    return str(request.param)


@pytest.fixture
async def make_engine(engine: str, tiny_model: Path) -> AsyncIterator[MakeEngine]:
    """Load engines of the test's kind on the tiny model; all are closed after the test."""
    made: list[SlotEngine] = []

    def make(progress: Callable[[float], None] | None = None, **kw: Any) -> SlotEngine:
        kw.setdefault("verify_restore", False)
        config = NodeConfig(model=tiny_model, engine=engine, threads=1, **kw)
        loaded = load_engine(config, progress)
        made.append(loaded)
        return loaded

    yield make
    for loaded in made:
        await loaded.close()


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def spec(
    session: str, messages: list[ChatMessage], ids: dict[int, tuple[int, ...]] | None = None,
    max_tokens: int = 8,
) -> TurnSpec:
    return TurnSpec(
        session=session,
        turn_id="t",
        messages=tuple(messages),
        assistant_tokens=ids or {},
        params=ReplyParams(sampling=GREEDY, max_tokens=max_tokens),
    )


async def run(
    engine: SlotEngine, s: TurnSpec, cancel: CancelToken | None = None,
    emit: Callable[[str], None] | None = None,
) -> TurnOutcome:
    return await engine.run_turn(s, emit or (lambda _text: None), cancel or CancelToken())


# -- behaviour, on every engine ------------------------------------------------------------
async def test_greedy_decoding_gives_the_same_tokens_every_time(make_engine, engine):
    """Greedy replies to one prompt are identical across sessions and across loads."""
    first = make_engine(n_slots=2)
    a = await run(first, spec("a", [user("hello there")], max_tokens=16))
    b = await run(first, spec("b", [user("hello there")], max_tokens=16))
    again = await run(make_engine(n_slots=1), spec("c", [user("hello there")], max_tokens=16))
    assert first.info.engine == engine
    assert a.usage.completion_tokens == 16 and a.completion_ids is not None
    assert a.completion_ids == b.completion_ids == again.completion_ids
    assert a.text == b.text == again.text != ""


async def test_second_turn_reuses_every_committed_token(make_engine):
    """Turn 2 evaluates only what turn 1 did not: all committed tokens come from the slot."""
    engine = make_engine(n_slots=1)
    first = await run(engine, spec("s", [user("hello there")]))
    assert first.completion_ids is not None
    history = [user("hello there"), ChatMessage(role="assistant", content=first.text)]
    second = await run(engine, spec("s", [*history, user("and then?")], {1: first.completion_ids}))
    assert second.usage.cached_tokens == first.n_tokens
    assert second.usage.new_prefill_tokens == second.usage.prompt_tokens - first.n_tokens
    assert second.cache.source == "slot" and second.cache.miss_reason is None


async def test_snapshot_restored_after_eviction_answers_like_a_cold_recompute(make_engine):
    """With one slot, an evicted session restores its banked state and answers what a
    recompute from scratch answers."""
    engine = make_engine(n_slots=1)
    cold = make_engine(n_slots=1, bank_ram_bytes=0)
    a1 = await run(engine, spec("a", [user("alpha")]))
    await run(engine, spec("b", [user("beta")]))  # evicts a, banking its state first
    history = [user("alpha"), ChatMessage(role="assistant", content=a1.text), user("more")]
    assert a1.completion_ids is not None
    a2 = await run(engine, spec("a", history, {1: a1.completion_ids}, max_tokens=12))
    assert a2.cache.source == "bank" and a2.usage.cached_tokens == a1.n_tokens
    c1 = await run(cold, spec("a", [user("alpha")]))
    assert c1.completion_ids == a1.completion_ids
    # Another session id: the cold engine evaluates the whole history from scratch.
    c2 = await run(cold, spec("a-cold", history, {1: c1.completion_ids}, max_tokens=12))
    assert c2.usage.cached_tokens == 0
    assert c2.completion_ids == a2.completion_ids and c2.text == a2.text


async def test_concurrent_sessions_answer_what_each_answers_alone(make_engine):
    """Four sessions decoding at once (one batch per step on llama-cpp) give each the
    greedy reply it gets running alone."""
    prompts = ["alpha beta", "the agent said hello", "water time people", "tool user turn"]
    alone = make_engine(n_slots=1)
    expected = [
        (await run(alone, spec(f"alone{i}", [user(p)], max_tokens=24))).completion_ids
        for i, p in enumerate(prompts)
    ]
    together = make_engine(n_slots=4)
    outs = await asyncio.gather(
        *(run(together, spec(f"s{i}", [user(p)], max_tokens=24)) for i, p in enumerate(prompts))
    )
    assert [o.completion_ids for o in outs] == expected
    assert all(o.usage.completion_tokens == 24 for o in outs)


async def test_cancel_stops_generation_within_one_token(make_engine):
    """A cancel set while the first token is emitted stops before a second one."""
    engine = make_engine(n_slots=1)
    cancel = CancelToken()
    pieces: list[str] = []

    def emit(text: str) -> None:
        pieces.append(text)
        cancel.cancel("client")

    out = await run(engine, spec("c", [user("go")], max_tokens=200), cancel, emit)
    assert out.finish_reason == "aborted"
    assert out.usage.completion_tokens == 1
    assert out.raw_text == "".join(pieces) != ""


async def test_prompt_longer_than_the_context_is_a_context_overflow(make_engine):
    """A prompt that does not fit the context is refused with context_overflow (422), and
    the slot still serves the next prompt."""
    engine = make_engine(n_slots=1, n_ctx=64)
    with pytest.raises(InferError) as info:
        await run(engine, spec("o", [user("word " * 200)]))
    assert info.value.code == ErrorCode.CONTEXT_OVERFLOW and info.value.status == 422
    ok = await run(engine, spec("o", [user("short")], max_tokens=4))
    assert ok.usage.completion_tokens == 4


async def test_a_reply_ends_at_any_end_of_generation_token(make_engine, monkeypatch):
    """Each end-of-generation token the backend names ends the reply, unprinted."""
    engine = make_engine(n_slots=1)
    eog = sorted(end_of_generation(engine.backend))
    assert engine.backend.eos_id in eog
    for i, token in enumerate(eog):
        monkeypatch.setattr(sampling_mod.Sampler, "sample", lambda self, z, r, t=token: t)
        out = await run(engine, spec(f"eog{i}", [user("hi")], max_tokens=8))
        assert out.finish_reason == "stop" and out.usage.completion_tokens == 0
        assert out.raw_text == ""


async def test_turns_make_no_threads_and_close_joins_every_engine_thread(tiny_model, engine):
    """Turns run on threads made at load; closing the engine ends all of them."""
    at_start = set(threading.enumerate())
    loaded = load_engine(NodeConfig(model=tiny_model, engine=engine, n_slots=2, threads=1,
                                        verify_restore=False))
    made = set(threading.enumerate()) - at_start
    try:
        await run(loaded, spec("x", [user("one")]))
        before = set(threading.enumerate())
        await asyncio.gather(*(run(loaded, spec(f"x{i}", [user("two")])) for i in range(3)))
        assert set(threading.enumerate()) == before
    finally:
        await loaded.close()
    assert made and not made & set(threading.enumerate())


async def test_loading_reports_progress_up_to_done(make_engine):
    """The weights' load reports its progress, ending at 1.0 (the CLI shows it)."""
    seen: list[float] = []
    make_engine(n_slots=1, progress=seen.append)
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)


async def test_node_answers_a_turn_on_the_configured_engine(make_node, engine):
    """A whole node started with the engine setting answers a prompt and reports it."""
    node = await make_node(engine=engine)
    assert node.engine is not None and node.engine.info.engine == engine
    async with InfernodeClient(node.url) as client:
        first = await client.complete("e", "hello world", sampling=GREEDY, max_tokens=6, timeout=60)
        second = await client.complete("e", "and more", sampling=GREEDY, max_tokens=6, timeout=60)
    assert first.text and first.done is not None
    assert first.done.usage.completion_tokens == 6
    assert second.done is not None
    committed = first.done.usage.prompt_tokens + first.done.usage.completion_tokens
    assert second.done.usage.cached_tokens == committed


async def test_a_new_session_imported_with_assistant_turns_reports_new_session(make_node):
    """Through a whole node: a session whose first prompt carries an earlier conversation
    (assistant messages included) misses its cache as new_session, not evicted."""
    node = await make_node()
    earlier = [user("hi"), ChatMessage(role="assistant", content="hello"), user("go on")]
    turn = TurnResult()
    async with InfernodeClient(node.url) as client:
        async for _token in client.prompt("imported", earlier, sampling=GREEDY, max_tokens=2,
                                          timeout=60, result=turn):
            pass
    assert turn.done is not None and turn.done.cache.miss_reason == "new_session"


# -- llama-cpp only ------------------------------------------------------------------------
@NEEDS_LLAMA_CPP
async def test_llama_cpp_ends_replies_at_end_of_turn_markup_too(tiny_model):
    """Current llama.cpp counts chat end-of-turn markup (<|im_end|>) as end of generation."""
    engine = load_engine(NodeConfig(model=tiny_model, engine="llama-cpp", n_slots=1,
                                        threads=1, verify_restore=False))
    try:
        im_end = engine.backend.tokenizer.encode("<|im_end|>", add_bos=False)
        assert len(im_end) == 1
        assert im_end[0] in end_of_generation(engine.backend)
        assert engine.backend.eos_id in end_of_generation(engine.backend)
    finally:
        await engine.close()


@NEEDS_LLAMA_CPP
async def test_repeat_penalty_never_sees_end_of_generation_tokens(tiny_model, monkeypatch):
    """End-of-turn markup in the history (<|im_end|>) is kept out of the repeat penalty, as
    EOS is, so a model is never pushed away from ending its reply."""
    engine = load_engine(NodeConfig(model=tiny_model, engine="llama-cpp", n_slots=1,
                                        threads=1, verify_restore=False))
    seen: list[list[int]] = []
    real_sample = sampling_mod.Sampler.sample

    def spy(self, logits, recent):
        seen.append(list(recent))
        return real_sample(self, logits, recent)

    try:
        eog = end_of_generation(engine.backend)
        history = [user("hello"), ChatMessage(role="assistant", content="hi"), user("again")]
        sampling = SamplingParams(temperature=0.8, repeat_penalty=1.5, seed=3)
        turn_spec = spec("p", history, max_tokens=4)
        turn_spec = dataclasses.replace(
            turn_spec, params=turn_spec.params.model_copy(update={"sampling": sampling})
        )
        assert eog & set(engine.prompt_tokens(turn_spec)[-64:])
        monkeypatch.setattr(sampling_mod.Sampler, "sample", spy)
        await run(engine, turn_spec)
        assert seen and not any(eog & set(r) for r in seen)
    finally:
        await engine.close()


@NEEDS_LLAMA_CPP
async def test_a_snapshot_of_one_engine_is_never_offered_to_the_other(tiny_model):
    """Both engines read the same file but keep KV state in different formats: a state
    banked by ctransformers is a model_mismatch on llama-cpp, never restored there."""
    ct, lc = (
        load_engine(NodeConfig(model=tiny_model, engine=e, n_slots=1, threads=1,
                                   verify_restore=False))
        for e in ("ctransformers", "llama-cpp")
    )
    try:
        a1 = await run(ct, spec("a", [user("alpha")]))
        await run(ct, spec("b", [user("beta")]))  # evicts a, banking its state
        assert ct.bank is not None and lc.bank is not None
        banked = ct.bank.get("a", a1.token_hash)
        assert banked is not None
        lc.bank.put(banked)
        history = [user("alpha"), ChatMessage(role="assistant", content=a1.text), user("more")]
        assert a1.completion_ids is not None
        a2 = await run(lc, spec("a", history, {1: a1.completion_ids}))
        assert a2.cache.source == "none" and a2.cache.miss_reason == "model_mismatch"
        assert a2.usage.cached_tokens == 0
    finally:
        await ct.close()
        await lc.close()


@NEEDS_LLAMA_CPP
async def test_llama_cpp_restore_is_verified_in_a_child_process_at_load(tiny_model):
    """Loading llama-cpp with verification checks per-sequence restore in a child."""
    engine = load_engine(NodeConfig(model=tiny_model, engine="llama-cpp", n_slots=1,
                                        threads=1))
    try:
        assert engine.info.snapshots and "equal" in engine.info.snapshot_note
    finally:
        await engine.close()


# -- engine selection ----------------------------------------------------------------------
def test_llama_cpp_engine_without_the_library_says_what_to_install(tiny_model, monkeypatch):
    """--engine llama-cpp where llama-cpp-python cannot be imported names the install."""
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_cpp", None)
    with pytest.raises(LlamaLibraryError, match=r"pip install 'infernode\[llamacpp\]'"):
        load_engine(NodeConfig(model=tiny_model, engine="llama-cpp", n_slots=1,
                                   verify_restore=False))


def test_default_threads_are_shared_per_evaluation_on_ctransformers_and_all_on_llama_cpp():
    """llama-cpp runs one decode at a time on every core; ctransformers' 0 means the cores
    are split among the slots busy at each evaluation (ThreadShare)."""
    assert default_threads("ctransformers", cores=16) == 0
    assert default_threads("llama-cpp", cores=16) == 16


def test_auto_picks_llama_cpp_whenever_it_is_installed(tiny_model, monkeypatch):
    """--engine auto runs even a file ctransformers reads on llama-cpp, the faster engine."""
    monkeypatch.setattr(loader_mod, "llama_cpp_available", lambda: True)
    assert choose_engine("auto", read_gguf_info(tiny_model)) == "llama-cpp"


def test_auto_without_llama_cpp_picks_ctransformers_for_a_file_it_reads(tiny_model, monkeypatch):
    """--engine auto falls back to ctransformers when its library reads the file."""
    monkeypatch.setattr(loader_mod, "llama_cpp_available", lambda: False)
    assert choose_engine("auto", read_gguf_info(tiny_model)) == "ctransformers"


@pytest.mark.parametrize(("change", "cause"), [
    ({"has_scores": False}, "tokenizer.ggml.scores"),
    ({"tokenizer_pre": "smollm"}, "tokenizer.ggml.pre"),
    ({"tokenizer_model": "t5"}, "'t5' tokenizer"),
    ({"version": 4}, "GGUF version 4"),
])
def test_auto_without_llama_cpp_refuses_a_file_ctransformers_cannot_read_naming_cause_and_fix(
    tiny_model, monkeypatch, change, cause
):
    """A llama GGUF with a current vocabulary (no scores, a pre-tokenizer), an unknown
    tokenizer or a newer version is refused at once: the cause, the install, the engine."""
    info = dataclasses.replace(read_gguf_info(tiny_model), **change)
    monkeypatch.setattr(loader_mod, "llama_cpp_available", lambda: False)
    with pytest.raises(LlamaCppMissingError) as err:
        choose_engine("auto", info)
    assert cause in str(err.value)
    assert "pip install 'infernode[llamacpp]'" in str(err.value)
    assert "--engine llama-cpp" in str(err.value)
    with pytest.raises(UnsupportedModelError, match=r"--engine llama-cpp"):
        choose_engine("ctransformers", info)


def test_auto_picks_llama_cpp_for_a_newer_architecture_when_installed(tiny_model, monkeypatch):
    """--engine auto runs a qwen2 GGUF on llama-cpp when llama-cpp-python is there."""
    info = dataclasses.replace(read_gguf_info(tiny_model), architecture="qwen2")
    monkeypatch.setattr(loader_mod, "llama_cpp_available", lambda: True)
    assert choose_engine("auto", info) == "llama-cpp"


def test_auto_without_llama_cpp_names_the_architecture_and_the_install(tiny_model, monkeypatch):
    """--engine auto on a qwen2 GGUF without llama-cpp-python says what to install."""
    info = dataclasses.replace(read_gguf_info(tiny_model), architecture="qwen2")
    monkeypatch.setattr(loader_mod, "llama_cpp_available", lambda: False)
    with pytest.raises(LlamaCppMissingError) as err:
        choose_engine("auto", info)
    assert isinstance(err.value, UnsupportedModelError)
    assert "--engine llama-cpp" in str(err.value)
    assert "qwen2" in str(err.value) and "pip install 'infernode[llamacpp]'" in str(err.value)


def test_ctransformers_refuses_a_newer_architecture(tiny_model):
    """--engine ctransformers on a qwen2 GGUF is refused, pointing at llama-cpp."""
    info = dataclasses.replace(read_gguf_info(tiny_model), architecture="qwen2")
    with pytest.raises(UnsupportedModelError, match="--engine llama-cpp"):
        choose_engine("ctransformers", info)


# -- the comparison benchmark --------------------------------------------------------------
@NEEDS_LLAMA_CPP
@pytest.mark.timeout(180)  # two whole nodes and llama-cpp-python run the real-model part
def test_quick_engines_comparison_prints_every_ratio_and_exits_0() -> None:
    """`python bench/engines_compare.py --quick` prints each ratio with a value and a
    verdict; no speed is asserted here."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "engines_compare.py"), "--quick"],
        cwd=root, capture_output=True, text=True, timeout=150, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = (
        "prefill tok/s, llama-cpp ÷ ctransformers",
        "decode tok/s, llama-cpp ÷ ctransformers",
        "llama-cpp: 4 sessions' decode tok/s ÷ one alone",
        "ctransformers: 4 sessions' decode tok/s ÷ one alone",
        "4 sessions at once, decode tok/s llama-cpp ÷ ctransformers",
        "ctransformers: one session's turn ms, shared cores ÷ fixed half",
        "real model first-turn TTFT, node ÷ raw (llama-cpp)",
        "real model warm-turn TTFT, node ÷ raw (llama-cpp)",
        "real model decode tok/s, node ÷ raw (llama-cpp)",
    )
    lines = proc.stdout.splitlines()
    for name in names:
        line = next((x for x in lines if x.startswith(name)), None)
        assert line is not None, f"no {name!r} line in:\n{proc.stdout}"
        value, _op, _target, verdict = line[len(name) :].split()
        float(value)
        assert verdict in ("PASS", "FAIL")
    assert "evaluations per llama_decode call" in proc.stdout
    assert "llama-cpp-python raw: first-turn TTFT" in proc.stdout
    assert "ctransformers through the node: first-turn TTFT" in proc.stdout


# -- clean ends, on every engine -----------------------------------------------------------
def _byte(b: int) -> int:
    """The tiny model's token for one byte (its byte tokens follow <unk>, <s> and </s>)."""
    return 3 + b


def _script(monkeypatch: pytest.MonkeyPatch, tokens: list[int]) -> list[int]:
    """Make the sampler return ``tokens`` in order; returns the list of tokens it handed out."""
    handed: list[int] = []
    queue = iter(tokens)

    def sample(self, logits, recent):  # type: ignore[no-untyped-def]
        handed.append(next(queue))
        return handed[-1]

    monkeypatch.setattr(sampling_mod.Sampler, "sample", sample)
    return handed


async def test_a_reply_cut_inside_a_character_finishes_it_with_up_to_three_more_tokens(
    make_engine, monkeypatch
):
    """max_tokens=2 falls inside 🏖 (4 bytes, one token each): two more tokens finish it,
    so the events and the reply end with the whole character, never U+FFFD."""
    engine = make_engine(n_slots=1)
    assert engine.backend.piece(_byte(0xF0)) == b"\xf0"
    beach = "🏖".encode()
    _script(monkeypatch, [_byte(b) for b in b"A" + beach + b"BCD"])
    pieces: list[str] = []
    out = await run(engine, spec("utf8", [user("hi")], max_tokens=2), emit=pieces.append)
    assert out.raw_text == "".join(pieces) == "A🏖"
    assert out.finish_reason == "length" and out.usage.completion_tokens == 5
    assert out.completion_ids == tuple(_byte(b) for b in b"A" + beach)


async def test_a_character_left_unfinished_is_dropped_from_events_and_reply(
    make_engine, monkeypatch
):
    """A reply that ends (here at EOS) after half a character drops those bytes instead of
    ending with U+FFFD."""
    engine = make_engine(n_slots=1)
    _script(monkeypatch, [_byte(ord("A")), _byte(0xF0), _byte(0x9F), engine.backend.eos_id])
    pieces: list[str] = []
    out = await run(engine, spec("cut", [user("hi")], max_tokens=8), emit=pieces.append)
    assert out.raw_text == out.text == "".join(pieces) == "A"
    assert out.finish_reason == "stop" and "\ufffd" not in out.raw_text


async def test_the_token_completing_a_stop_string_counts_in_completion_tokens(
    make_engine, monkeypatch
):
    """x, y, z with stop "yz": three tokens were generated (as llama-cpp-python counts
    them), the reply is "x"."""
    engine = make_engine(n_slots=1)
    _script(monkeypatch, [_byte(ord(c)) for c in "xyzw"])
    turn = spec("stop", [user("hi")], max_tokens=8)
    turn = dataclasses.replace(turn, params=turn.params.model_copy(update={"stop": ("yz",)}))
    out = await run(engine, turn)
    assert out.raw_text == "x" and out.finish_reason == "stop"
    assert out.usage.completion_tokens == 3


async def test_a_new_session_whose_first_prompt_has_assistant_turns_misses_as_new_session(
    make_engine,
):
    """A session that never had a turn reports new_session even when its messages carry an
    earlier conversation; one with committed turns and no state reports evicted."""
    engine = make_engine(n_slots=1, bank_ram_bytes=0)
    history = [user("hi"), ChatMessage(role="assistant", content="hello"), user("again")]
    fresh = await run(engine, spec("imported", history))
    assert fresh.cache.source == "none" and fresh.cache.miss_reason == "new_session"
    turn = dataclasses.replace(spec("restarted", history), generation=3)
    lost = await run(engine, turn)
    assert lost.cache.miss_reason == "evicted"


async def test_a_fallback_end_marker_the_model_lacks_is_a_stop_string(make_engine, monkeypatch):
    """With the gemma template on a vocabulary without <end_of_turn>, the marker written as
    text ends the turn, unprinted; chatml's <|im_end|> is a stop string only where the engine
    does not already end at that token."""
    engine = make_engine(n_slots=1, chat_template="gemma")
    assert engine.stops == ("<end_of_turn>",)
    _script(monkeypatch, [_byte(b) for b in b"Hi<end_of_turn>more"])
    out = await run(engine, spec("gemma", [user("hi")], max_tokens=30))
    assert out.raw_text == "Hi" and out.finish_reason == "stop"
    chatml = make_engine(n_slots=1, chat_template="chatml")
    im_end = chatml.backend.tokenizer.specials["<|im_end|>"]
    ends_there = im_end in end_of_generation(chatml.backend)
    assert chatml.stops == (() if ends_there else ("<|im_end|>",))


@NEEDS_LLAMA_CPP
def test_llama_cpp_refusing_a_file_quotes_its_own_reason(tmp_path):
    """A GGUF whose header reads but whose tensors are missing is refused by llama.cpp; the
    error carries llama.cpp's own words, not "could not load"."""
    from tests.support.gguf_files import write_header_only

    path = write_header_only(tmp_path / "hollow.gguf", "qwen2")
    with pytest.raises(ModelLoadError) as refused:
        load_engine(NodeConfig(model=path, engine="llama-cpp", n_slots=1, threads=1,
                                   verify_restore=False))
    message = str(refused.value)
    assert "could not load" not in message and "--llama-log" not in message
    assert "error" in message.lower() and str(path) in message


@NEEDS_LLAMA_CPP
@pytest.mark.parametrize(("setting", "value"), [("off", 0), ("on", 1), ("auto", -1)])
async def test_flash_attention_setting_reaches_the_llama_context(tiny_model, setting, value):
    """--flash-attn off/on/auto sets llama.cpp's flash_attn_type of the shared context."""
    engine = load_engine(NodeConfig(model=tiny_model, engine="llama-cpp", n_slots=1,
                                        threads=1, verify_restore=False, flash_attn=setting))
    try:
        assert engine.backend.shared.params.flash_attn == value
        out = await run(engine, spec("fa", [user("hi")], max_tokens=4))
        assert out.usage.completion_tokens == 4
    finally:
        await engine.close()


class _ThreadLog:
    """llama.cpp's bindings, recording the threads set and the sequences of every decode."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.threads: tuple[int, int] | None = None
        self.steps: list[tuple[tuple[int, int] | None, frozenset[int]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def llama_set_n_threads(self, ctx: Any, n_threads: int, n_threads_batch: int) -> None:
        self.threads = (n_threads, n_threads_batch)
        self._lib.llama_set_n_threads(ctx, n_threads, n_threads_batch)

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        seqs = frozenset(batch.seq_id[i][0] for i in range(batch.n_tokens))
        self.steps.append((self.threads, seqs))
        return int(self._lib.llama_decode(ctx, batch))


def test_defaults_are_flash_attention_auto_idle_cores_and_llama_servers_batch():
    """With no flags the node asks for flash attention where supported, threads decided per
    evaluation and the engine's own batch; the env still sets each."""
    config = NodeConfig()
    assert (config.flash_attn, config.threads, config.n_batch) == ("auto", 0, 0)
    assert loader_mod.default_batch("llama-cpp") == 2048
    assert loader_mod.default_batch("ctransformers") == 512
    env = {"INFERNODE_FLASH_ATTN": "off", "INFERNODE_THREADS": "3", "INFERNODE_N_BATCH": "256"}
    got = NodeConfig.from_env(env)
    assert (got.flash_attn, got.threads, got.n_batch) == ("off", 3, 256)


@NEEDS_LLAMA_CPP
async def test_the_llama_cpp_engine_loads_with_the_winning_defaults_and_says_so(tiny_model):
    """No flags: flash attention auto, every idle core, batch 2048 in micro-batches of 512,
    all three in the engine_loaded line."""
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        engine = load_engine(NodeConfig(model=tiny_model, engine="llama-cpp", n_slots=2,
                                        n_ctx=256, verify_restore=False))
    try:
        shared = engine.backend.shared
        assert shared.params.flash_attn == -1 and shared.params.threads == 0
        assert (engine.n_batch, shared.n_ubatch) == (2048, 512)
        loaded = next(e for e in logs if e["event"] == "engine_loaded")
        assert loaded["flash_attn"].startswith("auto") and "every idle core" in loaded["threads"]
        assert (loaded["n_batch"], loaded["n_ubatch"]) == (2048, 512)
    finally:
        await engine.close()


@NEEDS_LLAMA_CPP
async def test_a_lone_turn_uses_every_core_and_concurrent_turns_share_them_in_one_batch(
    tiny_model,
):
    """By default each llama_decode runs on every idle core: a lone turn's steps and the
    steps two concurrent turns share alike; cores other processes hold are left to them."""
    from actors.engine.backends.params import ThreadShare

    engine = load_engine(NodeConfig(model=tiny_model, engine="llama-cpp", n_slots=2,
                                    n_ctx=256, verify_restore=False))
    try:
        shared = engine.backend.shared
        shared.lib = lib = _ThreadLog(shared.lib)
        shared.share = ThreadShare(0, cores=2, load=lambda: 0.0)
        await run(engine, spec("lone", [user("hello there")], max_tokens=6))
        assert lib.steps and {t for t, _ in lib.steps} == {(2, 2)}
        lib.steps.clear()
        # Two slots' evaluations queued while the decode thread is held: its next step
        # carries both, as two running turns' decode steps do.
        held, release = threading.Event(), threading.Event()
        blocker = asyncio.create_task(asyncio.to_thread(
            shared.call, lambda: (held.set(), release.wait(10))))
        await asyncio.to_thread(held.wait, 10)
        evals = [asyncio.create_task(asyncio.to_thread(slot.ctx.eval, [5, 6, 7], 0))
                 for slot in engine.pool.slots]
        await until(lambda: len(shared._queue) == 2, what="both evaluations queued")
        release.set()
        await asyncio.gather(blocker, *evals)
        assert lib.steps == [((2, 2), frozenset({0, 1}))]
        lib.steps.clear()
        shared.share = ThreadShare(0, cores=2, load=lambda: 1.0)  # another process holds one
        await run(engine, spec("busy", [user("hello again")], max_tokens=4))
        assert {t for t, _ in lib.steps} == {(1, 1)}
    finally:
        await engine.close()


@NEEDS_LLAMA_CPP
async def test_threads_and_batch_flags_fix_what_the_llama_cpp_engine_uses(tiny_model):
    """--threads N sets N threads for every step; --batch sets the prefill chunk."""
    engine = load_engine(NodeConfig(model=tiny_model, engine="llama-cpp", n_slots=1,
                                    n_ctx=256, threads=1, n_batch=64, verify_restore=False))
    try:
        shared = engine.backend.shared
        shared.lib = lib = _ThreadLog(shared.lib)
        await run(engine, spec("fixed", [user("hello there " * 20)], max_tokens=4))
        assert {t for t, _ in lib.steps} == {(1, 1)} and engine.n_batch == 64
    finally:
        await engine.close()


@NEEDS_LLAMA_CPP
async def test_a_refused_decode_names_the_library_reason_and_where_each_sequence_stood(
    tiny_model,
):
    """A batch llama.cpp refuses says why (its own log line) and which positions it held, so a
    failed turn can be traced instead of reading only "code -1"."""
    from actors.engine.backends.llamacpp.context import LlamaCppDecodeError

    engine = load_engine(NodeConfig(model=tiny_model, engine="llama-cpp", n_slots=1,
                                    threads=1, verify_restore=False))
    try:
        shared = engine.backend.shared
        await asyncio.to_thread(shared.evaluate, 0, [5, 6, 7], 0, False)
        with pytest.raises(LlamaCppDecodeError) as refused:
            # Sequence 0 holds positions 0..2, so a batch starting at position 9 leaves a gap.
            await asyncio.to_thread(shared.evaluate, 0, [8, 9], 9, False)
        message = str(refused.value)
        assert refused.value.code == -1
        assert "sequence 0 positions 9..10 (it held 3)" in message, message
        assert "positions remain consecutive" in message.split("llama.cpp:")[1], message
    finally:
        await engine.close()


@NEEDS_LLAMA_CPP
async def test_sequences_decoding_in_one_step_reach_llama_cpp_in_id_order_with_their_own_logits(
    tiny_model,
):
    """Given three sequences whose next tokens are queued for one step in the order 2, 0, 1,
    the batch handed to llama_decode lists them 0, 1, 2 (with a KV stream per sequence,
    llama.cpp computes only a run of consecutive ids in one micro-batch; any other order costs
    a graph per sequence), and each sequence still gets the logits of its own token."""
    import numpy as np

    engine = load_engine(NodeConfig(model=tiny_model, engine="llama-cpp", n_slots=3,
                                    threads=1, verify_restore=False))
    try:
        shared = engine.backend.shared
        prompts = {0: [5, 6, 7], 1: [9, 8], 2: [11, 12, 13, 14]}
        for seq, tokens in prompts.items():
            await asyncio.to_thread(shared.evaluate, seq, tokens, 0, False)
        nxt = {0: 21, 1: 22, 2: 23}
        alone = {}
        for seq in prompts:  # each next token evaluated in a step of its own, then dropped
            alone[seq] = await asyncio.to_thread(
                shared.evaluate, seq, [nxt[seq]], len(prompts[seq]), False)
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            held.set()
            release.wait(10)

        blocker = asyncio.ensure_future(asyncio.to_thread(shared.call, hold))
        await asyncio.to_thread(held.wait, 10)
        together = {}

        async def queue(seq: int) -> None:
            queued = len(shared._queue)
            task = asyncio.ensure_future(asyncio.to_thread(
                shared.evaluate, seq, [nxt[seq]], len(prompts[seq]), True))
            # In the queue before the next one joins.
            await until(lambda: len(shared._queue) > queued, timeout=10, what=f"{seq} queued")
            together[seq] = task

        steps = shared.steps
        for seq in (2, 0, 1):
            await queue(seq)
        release.set()
        await blocker
        logits = {seq: await task for seq, task in together.items()}
        assert shared.steps == steps + 1, "the three tokens were not one llama_decode call"
        assert [shared._batch.seq_id[i][0] for i in range(3)] == [0, 1, 2]
        for seq in prompts:
            np.testing.assert_allclose(logits[seq], alone[seq], rtol=1e-4, atol=1e-4)
        assert not np.allclose(logits[0], logits[2])
    finally:
        await engine.close()
