"""The bank: every committed turn is banked after done, reuse across slots, miss reasons."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path

import pytest

from actors.bank_committer import BankCommitter
from actors.engine import sampling as sampling_mod
from actors.engine.bank.meta import SnapshotMeta
from actors.engine.bank.store import BankEntry
from actors.engine.interface import CancelToken, TurnSpec
from actors.engine.loader import load_engine
from node.client import InfernodeClient, TurnResult
from node.config import NodeConfig
from schemas.chat import ChatMessage, SamplingParams
from schemas.messages import PromptRequest
from schemas.records import ReplyParams
from schemas.subjects import Subjects
from tests.helpers import EventCollector, until

GREEDY = SamplingParams(temperature=0.0)
S = Subjects()


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def committer(node) -> BankCommitter:  # type: ignore[no-untyped-def]
    return next(a for a in node.actors if isinstance(a, BankCommitter))


async def ask(client: InfernodeClient, session: str, messages, max_tokens: int = 8) -> TurnResult:
    result = TurnResult()
    msgs = [user(messages)] if isinstance(messages, str) else list(messages)
    async for _ in client.prompt(session, msgs, sampling=GREEDY, max_tokens=max_tokens,
                                 timeout=60, result=result):
        pass
    assert result.done is not None and result.commit is not None
    return result


def script_sampler(monkeypatch: pytest.MonkeyPatch, token_ids: list[int]) -> None:
    """The model's next choices, scripted; prefill, decode and KV state stay real."""
    real = sampling_mod.Sampler.sample
    queue = list(token_ids)

    def scripted(self, logits, recent):  # type: ignore[no-untyped-def]
        return queue.pop(0) if queue else real(self, logits, recent)

    monkeypatch.setattr(sampling_mod.Sampler, "sample", scripted)


async def test_tool_call_turn_is_banked_and_the_tool_result_reuses_it(make_node, monkeypatch):
    """Given a turn that ends in a tool call, when it commits, then the committer banks its
    exact final state (prompt + completion tokens) and the tool-result turn reuses all of it."""
    node = await make_node(n_slots=1, threads=1)
    backend = node.engine.backend
    raw = '<tool_call>{"name": "read_file", "arguments": {"path": "a.py"}}</tool_call>'
    script_sampler(monkeypatch, backend.tokenizer.encode(raw, add_bos=False) + [backend.eos_id])
    async with InfernodeClient(node.url) as client:
        first = await ask(client, "tools", "open a.py", max_tokens=64)
        assert first.done.finish_reason == "tool_calls"
        await committer(node).wait_handled(1)
        assert committer(node).stored == 1
        (summary,) = (await client.sessions()).sessions
        (entry,) = summary.bank
        u = first.done.usage
        assert entry.tokens == u.prompt_tokens + u.completion_tokens
        assert re.fullmatch(r"[0-9a-f]{64}", entry.token_hash) and entry.nbytes > 0
        (call,) = first.done.tool_calls
        result = ChatMessage(role="tool", content="print('hi')", tool_call_id=call.id)
        second = await ask(client, "tools", [result])
    assert second.done.cache.source == "slot" and second.done.cache.miss_reason is None
    assert second.done.usage.cached_tokens == u.prompt_tokens + u.completion_tokens


async def test_four_sessions_on_two_slots_reuse_their_whole_prefix_every_turn(make_node):
    """Given 2 slots and 4 sessions taking turns in rotation, then every turn after a session's
    first reuses >= 95% of what its previous turn left (from the slot or a bank restore)."""
    node = await make_node(n_slots=2, threads=1)
    sessions = ["s0", "s1", "s2", "s3"]
    previous: dict[str, TurnResult] = {}
    sources = []
    async with InfernodeClient(node.url) as client:
        for turn in range(3):
            for sid in sessions:
                r = await ask(client, sid, f"turn {turn} of {sid}: look at the cache")
                before = previous.get(sid)
                if before is None:
                    assert r.done.cache.miss_reason == "new_session"
                else:
                    reusable = before.done.usage.prompt_tokens + before.done.usage.completion_tokens
                    assert r.done.cache.source in ("slot", "bank"), r.done.cache
                    assert r.done.usage.cached_tokens >= 0.95 * reusable, (sid, turn, r.done.usage)
                    sources.append(r.done.cache.source)
                previous[sid] = r
        metrics = await client.metrics()
        await committer(node).wait_handled(12)
        summaries = {s.session: s for s in (await client.sessions()).sessions}
    for sid, last in previous.items():
        summary = summaries[sid]
        assert summary.generation == 3 and summary.last_miss_reason is None
        assert summary.last_cache_source == last.done.cache.source
        assert summary.last_cached_tokens == last.done.usage.cached_tokens
        reusable = last.done.usage.prompt_tokens + last.done.usage.completion_tokens
        assert reusable in [e.tokens for e in summary.bank]
    assert "bank" in sources  # with 4 sessions on 2 slots, restores must have happened
    reused = metrics.value("infernode_cached_prompt_tokens_total")
    assert reused / metrics.value("infernode_prompt_tokens_total") > 0.5
    evictions = (metrics.value("infernode_slot_evictions_total")
                 + metrics.value("infernode_bank_evictions_total"))
    assert evictions > 0
    assert metrics.value("infernode_bank_restore_seconds_count") == sources.count("bank")
    assert metrics.total("infernode_bank_restores_total") == sources.count("bank")
    assert metrics.value("infernode_time_to_first_token_seconds_count") == 12


async def test_a_prompt_sent_on_done_reuses_the_live_slot_before_the_commit_lands(make_node, nc):
    """Given a second prompt published the moment turn 1's done arrives, then turn 2 reuses the
    live slot in full, and the bank still ends up with turn 2's state."""
    node = await make_node(n_slots=1, threads=1)
    js = nc.jetstream()
    second = PromptRequest(messages=(user("and next?"),), sampling=GREEDY, max_tokens=6)
    sent = asyncio.Event()

    async def on_done(msg) -> None:  # type: ignore[no-untyped-def]
        if not sent.is_set():
            sent.set()
            await js.publish(S.prompt("live"), second.model_dump_json().encode())

    await nc.subscribe(S.events("live", "done"), cb=on_done)
    commits = await EventCollector.start(nc, S.events("live", "commit"))
    dones = await EventCollector.start(nc, S.events("live", "done"))
    first = PromptRequest(messages=(user("first"),), sampling=GREEDY, max_tokens=6)
    await js.publish(S.prompt("live"), first.model_dump_json().encode())
    await commits.wait_until(lambda ms: len(ms) >= 2, timeout=60)
    d1, d2 = [json.loads(m.data) for m in dones.messages[:2]]
    reusable = d1["usage"]["prompt_tokens"] + d1["usage"]["completion_tokens"]
    assert d2["cache"]["source"] == "slot" and d2["usage"]["cached_tokens"] == reusable
    await committer(node).wait_handled(2)
    entries = node.engine.bank.session_entries("live")
    assert [e["tokens"] for e in entries] == [
        d2["usage"]["prompt_tokens"] + d2["usage"]["completion_tokens"]
    ]


async def test_a_failed_snapshot_is_dropped_with_its_reason_and_the_record_stays(make_node):
    """Given a slot whose state copy fails, when its turn commits, then the committer logs the
    reason and drops only that snapshot: the turn stays committed and the session goes on."""
    node = await make_node(n_slots=1, threads=1)
    ctx = node.engine.pool.slots[0].ctx

    def broken() -> bytes:
        raise RuntimeError("no memory for the copy")

    ctx.state_bytes = broken
    async with InfernodeClient(node.url) as client:
        first = await ask(client, "fragile", "hello")
        await committer(node).wait_handled(1)
        assert committer(node).dropped["error"] == 1 and committer(node).stored == 0
        history = await client.history("fragile")
        assert [r.status for r in history.records if r.kind == "assistant"] == ["committed"]
        second = await ask(client, "fragile", "still here")
    assert first.commit.generation == 1 and second.commit.generation == 2
    assert second.done.cache.source == "slot"


# -- the engine directly --------------------------------------------------------------------
def spec(session: str, messages, tokens=None, max_tokens: int = 8) -> TurnSpec:
    return TurnSpec(
        session=session,
        turn_id="t",
        messages=tuple(messages),
        assistant_tokens=tokens or {},
        params=ReplyParams(sampling=GREEDY, max_tokens=max_tokens),
    )


@pytest.fixture
async def engine(tiny_model: Path):
    made = load_engine(NodeConfig(model=tiny_model, engine="ctransformers", n_slots=1,
                                  threads=1, verify_restore=False))
    yield made
    await made.close()


async def run(engine, s: TurnSpec):  # type: ignore[no-untyped-def]
    return await engine.run_turn(s, lambda text: None, CancelToken())


async def test_snapshot_waits_bounded_for_a_busy_slot_then_drops_only_the_snapshot(engine):
    """Given a slot kept busy past the deadline, then the snapshot is dropped as 'deadline'
    and is not taken later either; the slot's state is untouched."""
    out = await run(engine, spec("busy", [user("hi")]))
    slot = engine.pool.slots[0]
    release = threading.Event()
    blocker = slot.worker.submit(lambda: release.wait(30))
    dropped = await engine.snapshot("busy", out.token_hash, wait_s=0.2)
    release.set()
    await blocker
    await slot.worker.submit(lambda: None)  # the expired job has run by now
    assert not dropped.stored and dropped.reason.startswith("deadline")
    assert not engine.bank.has("busy", out.token_hash)
    again = await run(engine, spec("busy", [user("hi"), user("more")]))
    assert again.cache.source == "slot"


async def test_a_late_snapshot_of_an_older_turn_is_superseded_by_the_live_slot(engine):
    """Given turn 2 ran before turn 1's snapshot, then turn 2 reused the live slot and the old
    snapshot is skipped as superseded while turn 2's own is stored."""
    one = await run(engine, spec("s", [user("one")]))
    history = [user("one"), ChatMessage(role="assistant", content=one.text), user("two")]
    two = await run(engine, spec("s", history, {1: one.completion_ids}))
    assert two.cache.source == "slot" and two.usage.cached_tokens == one.n_tokens
    late = await engine.snapshot("s", one.token_hash, wait_s=5)
    assert not late.stored and late.reason == "superseded"
    fresh = await engine.snapshot("s", two.token_hash, wait_s=5)
    assert fresh.stored and fresh.n_tokens == two.n_tokens


async def test_a_snapshot_queued_ahead_of_the_sessions_next_turn_yields_to_it(engine):
    """Given turn 2 of a session took the slot while turn 1's snapshot was still queued on
    the slot's worker, then the snapshot is skipped as superseded (turn 2 does not wait for
    the copy) and turn 2 reuses the live slot."""
    one = await run(engine, spec("s", [user("one")]))
    slot = engine.pool.slots[0]
    release = threading.Event()
    blocker = slot.worker.submit(lambda: release.wait(30))
    late = asyncio.ensure_future(engine.snapshot("s", one.token_hash, wait_s=30))
    history = [user("one"), ChatMessage(role="assistant", content=one.text), user("two")]
    two = asyncio.ensure_future(run(engine, spec("s", history, {1: one.completion_ids})))
    await until(lambda: slot.busy)
    release.set()
    await blocker
    snapshot, second = await late, await two
    assert not snapshot.stored and snapshot.reason == "superseded"
    assert second.cache.source == "slot" and second.usage.cached_tokens == one.n_tokens
    assert (await engine.snapshot("s", second.token_hash, wait_s=5)).stored


async def test_a_commit_snapshot_lets_the_sessions_next_turn_arriving_at_once_go_first(engine):
    """Given turn 1's commit snapshot was just requested and turn 2 of the same session
    arrives right after (a tool result, an agent's follow-up), then the copy does not start
    ahead of turn 2: the snapshot yields as superseded and turn 2's commit banks the longer
    state."""
    one = await run(engine, spec("s", [user("one")]))
    late = asyncio.ensure_future(engine.snapshot("s", one.token_hash, wait_s=30))
    # The answer reaches the agent and its next prompt comes back over the bus: in a node
    # that takes milliseconds, in which a copy started at once would already be under way.
    await asyncio.sleep(0.01)
    history = [user("one"), ChatMessage(role="assistant", content=one.text), user("two")]
    second = await run(engine, spec("s", history, {1: one.completion_ids}))
    snapshot = await late
    assert not snapshot.stored and snapshot.reason == "superseded"
    assert second.cache.source == "slot" and second.usage.cached_tokens == one.n_tokens
    banked = await engine.snapshot("s", second.token_hash, wait_s=5)
    assert banked.stored and banked.n_tokens == second.n_tokens


def _foreign_entry(engine, session: str, tokens: list[int], **override: str) -> BankEntry:  # type: ignore[no-untyped-def]
    c = engine.compat
    fields = {"model_id": c.model_id, "template": c.template, **override}
    meta = SnapshotMeta(session=session, tokens=tuple(tokens), nbytes=4, n_ctx=c.n_ctx, **fields)
    return BankEntry(meta, b"\0" * 4)


@pytest.mark.parametrize(
    ("override", "reason"),
    [({"model_id": "another-model"}, "model_mismatch"),
     ({"template": "llama-2"}, "template_mismatch")],
)
async def test_a_snapshot_of_another_model_or_template_is_never_restored(engine, override, reason):
    """Given the only snapshot of a session belongs to another model (or template), then the
    turn computes from scratch and names the mismatch."""
    s = spec("other", [user("hello")])
    engine.bank.put(_foreign_entry(engine, "other", engine.prompt_tokens(s), **override))
    out = await run(engine, s)
    assert out.cache.source == "none" and out.cache.miss_reason == reason
    assert out.usage.cached_tokens == 0


async def test_an_edited_history_reports_where_the_prefix_diverged(engine):
    """Given turn 2 rewrites the first message, then only the common prefix is reused and the
    miss names the token where the histories part."""
    one = await run(engine, spec("edit", [user("the original question")]))
    edited = [user("the edited question"), ChatMessage(role="assistant", content=one.text),
              user("again")]
    two = await run(engine, spec("edit", edited, {1: one.completion_ids}))
    n = two.usage.cached_tokens
    assert 0 < n < one.n_tokens
    assert two.cache.miss_reason == f"prefix_divergence_at_token {n}"


async def test_a_session_whose_snapshot_was_pushed_out_of_ram_reports_evicted(tiny_model):
    """Given a RAM bank that holds one snapshot, when a second session evicts the first's, then
    the first's next turn is a miss named 'evicted'."""
    settings = NodeConfig(model=tiny_model, engine="ctransformers", n_slots=1, threads=1,
                          verify_restore=False)
    probe = load_engine(settings)
    try:
        a1 = await run(probe, spec("a", [user("alpha")]))
        size = probe.pool.slots[0].ctx.state_bytes()
    finally:
        await probe.close()
    engine = load_engine(NodeConfig(
        model=tiny_model, engine="ctransformers", n_slots=1, threads=1, verify_restore=False,
        bank_ram_bytes=int(len(size) * 1.5), bank_session_bytes=int(len(size) * 1.5),
    ))
    try:
        a1 = await run(engine, spec("a", [user("alpha")]))
        await run(engine, spec("b", [user("beta")]))  # banks a, then b's slot
        await run(engine, spec("c", [user("gamma")]))  # banks b: a's entry is pushed out
        history = [user("alpha"), ChatMessage(role="assistant", content=a1.text), user("more")]
        again = await run(engine, spec("a", history, {1: a1.completion_ids}))
        assert engine.bank.stats()["evictions"] >= 1
        assert again.cache.source == "none" and again.cache.miss_reason == "evicted"
    finally:
        await engine.close()


async def test_a_new_session_restores_the_prefix_another_session_banked(tiny_model: Path):
    """Given session a banked a system prompt and a question, then a new session b of the
    same declared share group starting the same way restores that shared prefix from a's
    snapshot and computes only the rest."""
    engine = load_engine(NodeConfig(model=tiny_model, engine="ctransformers", n_slots=1,
                                    threads=1, verify_restore=False,
                                    bank_share_groups="review=shared-*"))
    try:
        system = ChatMessage(role="system", content="You review diffs and answer briefly. " * 4)
        a = await run(engine, spec("shared-a", [system, user("first question")]))
        banked = await engine.snapshot("shared-a", a.token_hash, wait_s=5)
        assert banked.stored
        b = await run(engine, spec("shared-b", [system, user("another question")]))
        cold = await run(engine, spec("shared-c", [user("nothing in common")]))
    finally:
        await engine.close()
    n = b.usage.cached_tokens
    assert b.cache.source == "bank" and 16 <= n < a.n_tokens
    assert b.cache.miss_reason == f"prefix_divergence_at_token {n}"
    assert cold.cache.source == "none" and cold.usage.cached_tokens == 0
