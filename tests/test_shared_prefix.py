"""Shared prefixes: any session of the same trust domain whose prompt begins with banked tokens
restores them, exactly. These sessions are agents of one mesh, a share group the operator
declared (``MESH``); tests/test_bank_security.py shows that nobody outside it shares."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from actors.engine.bank.durable import DirectoryBackend, DurableTier
from actors.engine.bank.store import BankMatch
from actors.engine.engine import SlotEngine
from actors.engine.interface import CancelToken, TurnOutcome, TurnSpec
from actors.engine.loader import load_engine
from actors.engine.tokens import token_hash
from node.config import NodeConfig
from schemas.chat import ChatMessage, SamplingParams
from schemas.records import ReplyParams

GREEDY = SamplingParams(temperature=0.0)
MESH = "mesh=a,b,s*"
"""The share group of every session here (``--bank-share-groups``)."""
PROMPTS = [
    ChatMessage(role="system", content=f"You are agent {k} of the mesh. Tools: search, "
                f"fetch, summarise, plan. Answer tersely and cite sources. Team {k}. " * 3)
    for k in range(3)
]


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def spec(session: str, messages, tokens=None) -> TurnSpec:  # type: ignore[no-untyped-def]
    return TurnSpec(
        session=session,
        turn_id="t",
        messages=tuple(messages),
        assistant_tokens=tokens or {},
        params=ReplyParams(sampling=GREEDY, max_tokens=3),
    )


async def run(engine: SlotEngine, s: TurnSpec) -> TurnOutcome:
    return await engine.run_turn(s, lambda text: None, CancelToken())


def engine_on(model: Path, **settings: object) -> SlotEngine:
    settings.setdefault("bank_share_groups", MESH)
    return load_engine(NodeConfig(model=model, threads=1, verify_restore=False, **settings))


@pytest.fixture
async def cold(tiny_model: Path):
    """An engine with no bank and one slot: every turn of a new session computes from zero."""
    made = engine_on(tiny_model, n_slots=1, bank_ram_bytes=0)
    yield made
    await made.close()


async def test_a_new_session_restores_the_system_prompt_another_session_banked(
    tiny_model: Path, cold: SlotEngine
):
    """Given session a's state in the bank, when a new session b starts with the same system
    prompt, then b restores a's snapshot up to where their prompts part, done names the shared
    prefix (tokens, content hash, tier, never a's id), and b answers what a cold compute does."""
    engine = engine_on(tiny_model, n_slots=1)
    try:
        await run(engine, spec("a", [PROMPTS[0], user("first agent here")]))
        b = spec("b", [PROMPTS[0], user("second agent, another question")])
        out = await run(engine, b)  # evicting a banks it; b then finds it by content
        tokens = engine.prompt_tokens(b)
    finally:
        await engine.close()
    n = out.usage.cached_tokens
    assert out.cache.source == "bank"
    assert out.cache.miss_reason == f"prefix_divergence_at_token {n}"
    assert out.cache.shared_from == "ram" and out.cache.shared_tokens == n > 32
    assert out.cache.shared_prefix == token_hash(tokens[:n])
    assert "a" not in out.cache.model_dump(exclude={"source"}).values()
    baseline = await run(cold, spec("b-cold", b.messages))
    assert baseline.usage.cached_tokens == 0 and out.text == baseline.text


async def test_a_restarted_node_restores_a_shared_prefix_from_the_durable_tier(
    tiny_model: Path, tmp_path: Path, cold: SlotEngine
):
    """Given a committed snapshot of session a in the durable tier, when a fresh engine (empty
    RAM) starts a new session with the same system prompt, then it restores a's state from the
    durable tier and answers what a cold compute does."""
    first = engine_on(tiny_model, n_slots=1)
    tier = DurableTier([DirectoryBackend(tmp_path / "bank")], groups=first.bank.groups)  # type: ignore[union-attr]
    first.bank.attach(tier)  # type: ignore[union-attr]
    try:
        one = await run(first, spec("a", [PROMPTS[1], user("remember the tools")]))
        assert (await first.snapshot("a", one.token_hash, wait_s=30)).stored
    finally:
        tier.close()
        await first.close()
    second = engine_on(tiny_model, n_slots=1)
    again = DurableTier([DirectoryBackend(tmp_path / "bank")], groups=second.bank.groups)  # type: ignore[union-attr]
    assert await asyncio.to_thread(again.open) == 1
    second.bank.attach(again)  # type: ignore[union-attr]
    b = spec("b", [PROMPTS[1], user("a new agent after the restart")])
    try:
        out = await run(second, b)
    finally:
        again.close()
        await second.close()
    assert out.cache.source == "bank" and out.cache.shared_from == "durable"
    assert out.cache.shared_tokens == out.usage.cached_tokens > 32
    baseline = await run(cold, spec("b-cold", b.messages))
    assert out.text == baseline.text


async def test_a_new_session_shares_a_prefix_whose_commit_snapshot_has_not_come_yet(
    tiny_model: Path,
):
    """Given session a's turn just ended in its slot, its commit snapshot not yet requested
    (it comes over the bus after the answer), when a new session b with the same system
    prompt starts in another free slot, then b still restores a's state by content and
    computes only the rest; a's commit snapshot later finds it banked."""
    engine = engine_on(tiny_model, n_slots=2)
    try:
        a = await run(engine, spec("a", [PROMPTS[1], user("first agent here")]))
        b = await run(engine, spec("b", [PROMPTS[1], user("second agent, another question")]))
        late = await engine.snapshot("a", a.token_hash, wait_s=30)
    finally:
        await engine.close()
    assert b.cache.source == "bank" and b.cache.shared_from == "ram"
    assert b.usage.cached_tokens > 32 and b.usage.new_prefill_tokens < b.usage.prompt_tokens // 4
    assert late.stored and late.reason == "already_banked"


async def test_a_state_of_the_same_tokens_is_stored_once_whichever_session_banks_it(
    tiny_model: Path,
):
    """Given two sessions whose prompts are identical, when both are banked, then the RAM tier
    holds one copy of that state and the second bank says already_banked."""
    engine = engine_on(tiny_model, n_slots=1)
    try:
        same = [PROMPTS[2], user("identical opening")]
        one = await run(engine, spec("a", same))
        stored = await engine.snapshot("a", one.token_hash, wait_s=30)
        two = await run(engine, spec("b", same))
        again = await engine.snapshot("b", two.token_hash, wait_s=30)
        stats = engine.bank.stats()  # type: ignore[union-attr]
    finally:
        await engine.close()
    assert one.token_hash == two.token_hash and stored.stored
    assert two.cache.shared_from == "ram"
    assert again.stored and again.reason == "already_banked"
    assert stats["entries"] == 1 and stats["bytes"] == stored.nbytes


async def test_a_thousand_interleaved_turns_never_restore_another_conversation(
    tiny_model: Path, cold: SlotEngine
):
    """Given 1,000 turns interleaved at random over 40 sessions on 2 slots, sessions sharing
    three system prompts and then diverging, then every restored snapshot holds exactly the
    tokens it claims, of this model, agreeing with the prompt over every reused token, and on a
    sample of turns the greedy reply equals a cold recompute of the same prompt."""
    engine = engine_on(tiny_model, n_slots=2)
    restores: list[tuple[str, BankMatch]] = []
    real = engine.bank.best_match  # type: ignore[union-attr]

    def watched(session, tokens, compat):  # type: ignore[no-untyped-def]
        match = real(session, tokens, compat)
        restores.append((session, match))
        return match

    engine.bank.best_match = watched  # type: ignore[union-attr,method-assign]
    rng = random.Random(19)
    histories: dict[str, tuple[list[ChatMessage], dict[int, tuple[int, ...]]]] = {}
    shared = checked = 0
    try:
        for turn in range(1000):
            session = f"s{rng.randrange(40)}"
            messages, ids = histories.setdefault(
                session, ([PROMPTS[int(session[1:]) % 3]], {})
            )
            if len(messages) > 9:  # a conversation ends; a new one takes its id
                del messages[1:]
                ids.clear()
            messages.append(user(f"{session} asks {turn} {rng.randrange(10**6)}"))
            s = spec(session, messages, dict(ids))
            tokens = engine.prompt_tokens(s)
            restores.clear()
            out = await run(engine, s)
            if out.cache.source == "bank":
                (who, match), = restores
                assert who == session and match.entry is not None
                meta, n = match.entry.meta, out.usage.cached_tokens
                assert meta.token_hash == token_hash(meta.tokens)
                assert meta.model_id == engine.compat.model_id
                assert list(meta.tokens[:n]) == tokens[:n] and n <= len(meta.tokens)
                shared += out.cache.shared_from is not None
            if turn % 20 == 0:
                baseline = await run(cold, spec(f"cold{turn}", messages, dict(ids)))
                assert baseline.usage.prompt_tokens == len(tokens)
                assert out.completion_ids == baseline.completion_ids, f"turn {turn}"
                checked += 1
            messages.append(ChatMessage(role="assistant", content=out.text))
            if out.completion_ids is not None:
                ids[len(messages) - 1] = out.completion_ids
    finally:
        await engine.close()
    assert shared > 25 and checked == 50
