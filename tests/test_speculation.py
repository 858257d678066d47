"""Speculative decoding by n-gram lookup: proposals, the acceptance law, and that replies,
KV state and later turns are what decoding without speculation gives."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors.engine import speculation as speculation_mod
from actors.engine.backends.llamacpp.backend import llama_cpp_available
from actors.engine.decode import decode
from actors.engine.engine import SlotEngine
from actors.engine.interface import CancelToken, TurnOutcome, TurnSpec
from actors.engine.loader import load_engine, speculation_for
from actors.engine.slots import Slot
from actors.engine.speculation import MAX_DRAFT, MAX_MATCH, DraftPolicy, NgramProposer
from node.config import ConfigError, NodeConfig
from schemas.chat import ChatMessage, SamplingParams
from schemas.records import ReplyParams
from schemas.tools import JsonObjectFormat

NEEDS_LLAMA_CPP = pytest.mark.skipif(
    not llama_cpp_available(),
    reason="llama-cpp-python is not installed (pip install 'infernode[llamacpp]')",
)
GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0, seed=11)
REPEATED = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 4
MakeEngine = Callable[..., SlotEngine]


# -- the proposer ----------------------------------------------------------------------------
def test_proposer_continues_the_longest_earlier_match_of_the_suffix() -> None:
    """The tokens after the latest occurrence of the longest matching suffix are proposed."""
    # Suffix [7, 8, 9] occurs at 0..2 (followed by 1 2 3); [8, 9] alone also at 5..6.
    proposer = NgramProposer([7, 8, 9, 1, 2, 3, 8, 9, 5, 6, 7, 8, 9], capacity=32)
    assert proposer.propose(3) == [1, 2, 3]
    proposer.append(1)
    assert proposer.propose(2) == [2, 3]


def test_proposer_proposes_nothing_without_a_two_token_match() -> None:
    """A lone recurring last token, or none at all, proposes nothing."""
    assert NgramProposer([1, 2, 3, 4, 5, 3], capacity=16).propose(4) == []
    assert NgramProposer([1, 2, 3, 4], capacity=16).propose(4) == []
    assert NgramProposer([1, 2, 1, 2], capacity=16).propose(0) == []


def test_proposer_prefers_a_match_with_the_whole_proposal_after_it() -> None:
    """In a repeating run longer than the longest suffix looked for, the latest match with
    k tokens after it wins, not the very last (which has one)."""
    proposer = NgramProposer([4, 5] * (MAX_MATCH // 2 + 4), capacity=64)
    assert proposer.propose(3) == [4, 5, 4]
    assert NgramProposer([4, 5, 4, 5, 4, 5], capacity=16).propose(3) == [4, 5]


# -- the draft policy -------------------------------------------------------------------------
def _policy(t1: float, per_extra: float, kept_of_8: int) -> DraftPolicy:
    policy = DraftPolicy(MAX_DRAFT)
    for _ in range(30):  # enough samples to outweigh the priors
        policy.timed(1, t1)
        policy.timed(9, t1 + 8 * per_extra)
        policy.verified(min(kept_of_8 + 1, 8), kept_of_8)
    return policy


def test_policy_proposes_whole_where_a_batch_costs_about_one_token() -> None:
    """Verification as cheap as one token (a GPU): every proposal is verified whole."""
    assert _policy(0.010, 0.0001, kept_of_8=6).length(8) == 8


def test_policy_proposes_nothing_where_verifying_costs_per_token_and_little_is_kept() -> None:
    """Each verified token costing as much as a decode step and few kept: no proposal,
    except one in 16 that keeps measuring."""
    policy = _policy(0.050, 0.040, kept_of_8=1)
    lengths = [policy.length(8) for _ in range(32)]
    assert lengths.count(0) == 30 and lengths.count(2) == 2


def test_policy_proposes_some_where_a_per_token_cost_meets_a_high_acceptance() -> None:
    """Costly verification but most proposed tokens kept: a proposal, shorter than the limit
    where the tail rarely survives."""
    assert 0 < _policy(0.050, 0.030, kept_of_8=8).length(8) <= 8
    assert _policy(0.050, 0.030, kept_of_8=8).length(8) > _policy(0.050, 0.030, 5).length(8)


# -- the acceptance law, at unit level -----------------------------------------------------
class _Tokens:
    """A six-token vocabulary: 0..3 are drawn, 4 only opens pairs, 5 (the EOS) never comes."""

    eos_id = 5
    n_vocab = 6
    eog_ids = frozenset({5})

    def piece(self, token: int) -> bytes:
        return b"abcd|!"[token : token + 1]


class _FixedLogits:
    """A context whose next-token logits are the same at every position (a known p)."""

    def __init__(self, row: np.ndarray) -> None:
        self.n_ctx = 64
        self.row = row
        self.verified: list[list[int]] = []

    def eval(self, tokens: Sequence[int], n_past: int) -> None:
        pass

    def logits(self) -> np.ndarray:
        return self.row

    def eval_all(self, tokens: Sequence[int], n_past: int) -> np.ndarray:
        self.verified.append(list(tokens))
        return np.tile(self.row, (len(tokens), 1))

    def discard(self, n_past: int) -> None:
        pass

    def state_bytes(self) -> bytes:
        return b""

    def set_state(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class _Always(DraftPolicy):
    """Verifies every proposal whole, whatever it costs."""

    def length(self, room: int) -> int:
        return min(room, self.limit)


# After its last token 4, the pair (4, x) is followed by (x + 1) % 4: whatever the first
# token drawn, the next is proposed, and each of the four tokens is proposed after one of them.
PROMPT = [4, 0, 1, 4, 1, 2, 4, 2, 3, 4, 3, 0, 4]


def test_a_proposed_token_is_accepted_with_its_probability_else_drawn_from_the_rest() -> None:
    """Over 4,000 seeded replies a proposed token t is kept with probability p(t); when it
    is not, the token drawn is distributed as p without t, renormalised."""
    row = np.array([1.0, 0.3, -0.2, 0.6, -np.inf, -np.inf], dtype=np.float32)
    p = np.exp(row[:4] - row[:4].max())
    p /= p.sum()
    ctx = _FixedLogits(row)
    slot = Slot(0, ctx)
    offered, kept = np.zeros(4), np.zeros(4)
    instead = np.zeros((4, 4))
    try:
        for seed in range(4000):
            slot.tokens = list(PROMPT)
            params = SAMPLED.model_copy(update={"seed": seed})
            out = decode(_Tokens(), slot, params, (), 2, lambda _t: None, CancelToken(),
                         speculation=_Always(2))
            assert out.completion_ids is not None and len(out.completion_ids) == 2
            draft, second = ctx.verified[-1][1], out.completion_ids[1]
            offered[draft] += 1
            kept[draft] += second == draft
            instead[draft, second] += second != draft
    finally:
        slot.worker.stop()
    assert offered.sum() == 4000  # every reply's second token was proposed
    for t in range(4):
        n = offered[t]
        assert abs(kept[t] / n - p[t]) < 4 * np.sqrt(p[t] * (1 - p[t]) / n), (t, kept[t] / n)
        rest = np.delete(p, t) / (1 - p[t])
        seen = np.delete(instead[t], t)
        chi2 = float((((seen - rest * seen.sum()) ** 2) / (rest * seen.sum())).sum())
        assert chi2 < 13.8, (t, seen, rest)  # 2 degrees of freedom, p = 0.001


# -- on the llama-cpp engine ----------------------------------------------------------------
@pytest.fixture
async def make_engine(tiny_model: Path) -> AsyncIterator[MakeEngine]:
    """llama-cpp engines on the tiny model; all are closed after the test."""
    made: list[SlotEngine] = []

    def make(**kw: Any) -> SlotEngine:
        kw.setdefault("verify_restore", False)
        kw.setdefault("speculate", "on")
        loaded = load_engine(NodeConfig(model=tiny_model, engine="llama-cpp", threads=1, **kw))
        made.append(loaded)
        return loaded

    yield make
    for loaded in made:
        await loaded.close()


def _spec(
    session: str, messages: list[ChatMessage], sampling: SamplingParams, max_tokens: int = 48,
    ids: dict[int, tuple[int, ...]] | None = None, **kw: Any,
) -> TurnSpec:
    return TurnSpec(
        session=session, turn_id="t", messages=tuple(messages),
        params=ReplyParams(sampling=sampling, max_tokens=max_tokens, **kw),
        assistant_tokens=ids or {}, generation=1 if ids else 0,
    )


async def _run(engine: SlotEngine, spec: TurnSpec) -> TurnOutcome:
    return await engine.run_turn(spec, lambda _text: None, CancelToken())


def _user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def _filled(engine: SlotEngine, session: str) -> tuple[int, int]:
    """(cells the session's KV sequence holds, tokens its slot says it holds)."""
    slot = engine.pool.resident(session)
    assert slot is not None
    shared, seq = slot.ctx.shared, slot.ctx.seq_id  # type: ignore[attr-defined]
    return shared.call(lambda: shared.filled(seq)), len(slot.tokens)


async def _two_turns(engine: SlotEngine, sampling: SamplingParams) -> list[TurnOutcome]:
    first = await _run(engine, _spec("s", [_user(REPEATED)], sampling))
    assert first.completion_ids is not None
    history = [_user(REPEATED), ChatMessage(role="assistant", content=first.text),
               _user("again: " + REPEATED)]
    second = await _run(engine, _spec("s", history, sampling, ids={1: first.completion_ids}))
    return [first, second]


@NEEDS_LLAMA_CPP
async def test_greedy_replies_are_token_for_token_those_without_speculation(make_engine):
    """Greedy replies with speculation on equal those with it off, on several prompts."""
    on, off = make_engine(), make_engine(speculate="off")
    assert on.draft == MAX_DRAFT and off.draft == 0
    for i, text in enumerate([REPEATED, "hello there", "a b c a b c a b c"]):
        a = await _run(on, _spec(f"g{i}", [_user(text)], GREEDY))
        b = await _run(off, _spec(f"g{i}", [_user(text)], GREEDY))
        assert a.completion_ids == b.completion_ids and a.text == b.text
    counts = on.turn_stats.counters()
    assert counts["accepted_tokens"] > 0
    assert off.turn_stats.counters()["proposed_tokens"] == 0


@NEEDS_LLAMA_CPP
async def test_rejected_proposals_leave_no_cells_and_the_next_turn_is_unchanged(make_engine):
    """A seeded sampled reply with rejected proposals, and the turn after it, equal those
    without speculation, and the KV sequence holds exactly the slot's tokens after each."""
    on, off = make_engine(), make_engine(speculate="off")
    with_spec = await _two_turns(on, SAMPLED)
    assert _filled(on, "s")[0] == _filled(on, "s")[1]
    without = await _two_turns(off, SAMPLED)
    counts = on.turn_stats.counters()
    assert 0 < counts["accepted_tokens"] < counts["proposed_tokens"]  # some were rejected
    assert [o.completion_ids for o in with_spec] == [o.completion_ids for o in without]
    assert with_spec[1].usage.cached_tokens == with_spec[0].n_tokens


@NEEDS_LLAMA_CPP
async def test_greedy_stays_exact_when_every_proposal_is_partly_wrong(make_engine, monkeypatch):
    """Proposals whose second token is always wrong are trimmed each step; greedy replies
    over two turns still equal those without speculation, and no cell is left over."""

    def half_right(self: NgramProposer, k: int) -> list[int]:
        last = int(self._ids[self._n - 1])
        return [last, (last + 1) % 500, last][:k]

    off = make_engine(speculate="off")
    without = await _two_turns(off, GREEDY)
    monkeypatch.setattr(speculation_mod.NgramProposer, "propose", half_right)
    on = make_engine()
    with_spec = await _two_turns(on, GREEDY)
    counts = on.turn_stats.counters()
    assert counts["accepted_tokens"] < counts["proposed_tokens"]
    assert [o.completion_ids for o in with_spec] == [o.completion_ids for o in without]
    assert _filled(on, "s")[0] == _filled(on, "s")[1]


@NEEDS_LLAMA_CPP
async def test_a_reply_cut_with_proposals_pending_drops_their_cells(make_engine):
    """A reply cancelled while proposed tokens wait in the KV cache leaves none there, and
    the session's next turn equals the one without speculation."""

    async def cut_then_continue(engine: SlotEngine) -> tuple[TurnOutcome, TurnOutcome]:
        cancel, pieces = CancelToken(), []

        def emit(text: str) -> None:
            pieces.append(text)
            if len(pieces) == 3:
                cancel.cancel("client")

        first = await engine.run_turn(_spec("c", [_user(REPEATED)], GREEDY), emit, cancel)
        assert first.finish_reason == "aborted" and first.completion_ids is not None
        filled, held = _filled(engine, "c")
        assert filled == held == first.n_tokens
        history = [_user(REPEATED), ChatMessage(role="assistant", content=first.text),
                   _user("more")]
        ids = {1: first.completion_ids}
        return first, await _run(engine, _spec("c", history, GREEDY, ids=ids))

    on, off = make_engine(), make_engine(speculate="off")
    with_spec, without = await cut_then_continue(on), await cut_then_continue(off)
    assert on.turn_stats.counters()["proposed_tokens"] > 0
    assert [o.completion_ids for o in with_spec] == [o.completion_ids for o in without]


@NEEDS_LLAMA_CPP
async def test_grammar_constrained_turns_do_not_speculate(make_engine):
    """A JSON-format reply proposes nothing and equals the reply without speculation."""
    fmt = JsonObjectFormat()
    on, off = make_engine(), make_engine(speculate="off")
    spec = _spec("j", [_user('{"a": 1, "a": 1, "a": 1}')], GREEDY, response_format=fmt)
    a, b = await _run(on, spec), await _run(off, spec)
    assert a.completion_ids == b.completion_ids
    assert on.turn_stats.counters()["proposed_tokens"] == 0


@NEEDS_LLAMA_CPP
async def test_speculate_off_proposes_nothing(make_engine):
    """With --speculate off a reply that would repeat its prompt proposes no token."""
    engine = make_engine(speculate="off")
    await _run(engine, _spec("o", [_user(REPEATED)], GREEDY))
    assert engine.draft == 0 and engine.turn_stats.counters()["proposed_tokens"] == 0


async def test_the_ctransformers_engine_does_not_speculate(tiny_model):
    """ctransformers' contexts keep only the last token's logits: no speculation there."""
    engine = load_engine(NodeConfig(model=tiny_model, engine="ctransformers", threads=1,
                                    verify_restore=False))
    try:
        await _run(engine, _spec("c", [_user(REPEATED)], GREEDY, max_tokens=8))
        assert engine.draft == 0 and engine.turn_stats.counters()["proposed_tokens"] == 0
    finally:
        await engine.close()


def test_speculate_comes_from_the_environment_and_is_checked() -> None:
    """INFERNODE_SPECULATE sets it (default auto); another value is refused naming the flag."""
    assert NodeConfig().speculate == "auto"
    assert NodeConfig.from_env({"INFERNODE_SPECULATE": "on"}).speculate == "on"
    assert NodeConfig.from_env({"INFERNODE_SPECULATE": "off"}).speculate == "off"
    with pytest.raises(ConfigError, match="--speculate"):
        NodeConfig.from_env({"INFERNODE_SPECULATE": "maybe"})


def test_auto_speculates_on_a_gpu_and_not_on_a_cpu() -> None:
    """``--speculate auto`` is on where layers run on a GPU and off on a CPU, where verifying
    costs almost a step per token and a greedy reply must keep a plain decode's tokens."""
    assert speculation_for("auto", 0) == "off"
    assert speculation_for("auto", 99) == "on"
    assert speculation_for("on", 0) == "on" and speculation_for("off", 99) == "off"


async def test_the_default_engine_on_a_cpu_does_not_speculate(make_engine):
    """An engine loaded with the default setting on a CPU proposes nothing."""
    assert make_engine(speculate="auto").draft == 0
