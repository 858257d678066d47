"""Durability: SIGKILL mid-turn loses nothing; the durable bank tier restores after restarts."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from actors.bank_committer import BankCommitter
from actors.engine.bank.durable import DirectoryBackend, DurableTier
from actors.engine.bank.meta import SnapshotMeta
from actors.engine.bank.objects import ObjectStoreBackend, open_object_store
from node.app import Node
from node.client import InfernodeClient, TurnResult
from node.config import NodeConfig
from node.demo_model import write_llama_gguf
from node.nats_server import EmbeddedNats
from schemas.chat import ChatMessage, SamplingParams
from schemas.messages import PromptRequest
from schemas.subjects import Subjects
from tests.helpers import EventCollector, wait_for_event
from tests.support.node_process import NodeProcess, kinds

GREEDY = SamplingParams(temperature=0.0)
S = Subjects()


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def committer(node: Node) -> BankCommitter:
    return next(a for a in node.actors if isinstance(a, BankCommitter))


async def ask(url: str, session: str, text: str, max_tokens: int = 8) -> TurnResult:
    async with InfernodeClient(url) as client:
        result = await client.complete(session, text, sampling=GREEDY, max_tokens=max_tokens,
                                  timeout=60)
    assert result.done is not None and result.commit is not None
    return result


@pytest.mark.timeout(300)
async def test_sigkill_mid_turn_loses_no_prompt_and_no_commit_and_answers_after_restart(
    nats_server: EmbeddedNats, nc, tiny_model: Path, tmp_path: Path
):
    """Given a committed turn, a long turn streaming, and a second prompt accepted meanwhile,
    when the node is SIGKILLed and restarted, then the committed record is intact, the cut turn
    is an ABORTED provisional record, and every accepted prompt (and one sent while the node was
    down) is answered by a committed turn."""
    data, url, js = tmp_path / "node", nats_server.url, nc.jetstream()
    events = await EventCollector.start(nc, S.events_all("crash"))
    node = await NodeProcess.up(url, data, tiny_model, "--ctx", "4096")
    try:
        first = await ask(url, "crash", "remember this", max_tokens=4)
        long = PromptRequest(messages=(user("talk for a long time"),), sampling=GREEDY,
                             max_tokens=8000)
        await js.publish(S.prompt("crash"), long.model_dump_json().encode())
        await events.wait_until(lambda ms: len(kinds(events, "started")) >= 2, timeout=60)
        cut_turn = kinds(events, "started")[1]["turn_id"]
        await events.wait_until(lambda ms: any(
            t["turn_id"] == cut_turn for t in kinds(events, "token")), timeout=60)
        waiting = PromptRequest(messages=(user("are you there?"),), sampling=GREEDY, max_tokens=4)
        await js.publish(S.prompt("crash"), waiting.model_dump_json().encode())
        await events.wait_until(lambda ms: len(kinds(events, "accepted")) >= 3, timeout=30)
        assert not [d for d in kinds(events, "done") if d["turn_id"] == cut_turn], \
            "the long turn ended before the kill; the test needs a longer turn"
        await node.kill()
        offline = PromptRequest(messages=(user("sent while down"),), sampling=GREEDY, max_tokens=4)
        await js.publish(S.prompt("crash"), offline.model_dump_json().encode())
        node = await NodeProcess.up(url, data, tiny_model, "--ctx", "4096")
        await events.wait_until(lambda ms: len(kinds(events, "accepted")) >= 4, timeout=60)
        accepted = [i for a in kinds(events, "accepted") for i in a["message_ids"]]
        answered = lambda: {p for c in kinds(events, "commit") for p in c["parent_ids"]}  # noqa: E731
        await events.wait_until(lambda ms: answered() >= set(accepted), timeout=60)
        async with InfernodeClient(url) as client:
            history = await client.history("crash")
    finally:
        await node.terminate()
    assert len(accepted) == 4
    records = history.records
    users = [r.id for r in records if r.kind == "user"]
    assert users == accepted  # each accepted prompt recorded once, in order
    assistants = [r for r in records if r.kind == "assistant"]
    assert assistants[0].id == first.commit.record_id and assistants[0].status == "committed"
    (cut,) = [r for r in records if r.kind == "provisional"]
    assert cut.turn_id == cut_turn and cut.status == "ABORTED"
    (abort,) = [r for r in records if r.kind == "abort"]
    assert abort.turn_id == cut_turn and abort.reason == "node_restart"
    commits = [r for r in records if r.kind == "commit"]
    assert [c.generation for c in commits] == list(range(1, len(commits) + 1))
    assert commits[1].supersedes == cut.id
    assert history.generation == len(commits) >= 2


@pytest.mark.parametrize("tier", ["dir", "object_store"])
async def test_a_restarted_node_restores_an_old_session_from_the_durable_tier(
    make_node, tmp_path: Path, tier: str
):
    """Given the durable bank tier, when the node restarts (RAM bank empty), then the first
    turn on an old session restores its committed snapshot instead of recomputing it, and
    answers exactly what a recompute from scratch answers."""
    opts = {"bank_dir": tmp_path / "bank"} if tier == "dir" else {"bank_object_store": True}
    first = await make_node(fresh_server=True, threads=1, **opts)
    one = await ask(first.url, "old", "remember this conversation")
    await committer(first).wait_handled(1)
    assert committer(first).stored == 1
    await first.stop()  # finishes queued durable writes

    second = await make_node(url=first.url, threads=1, **opts)
    async with InfernodeClient(second.url) as client:
        (summary,) = (await client.sessions()).sessions
        health = await client.health()
        two = (await client.complete("old", "and now?", sampling=GREEDY, max_tokens=8, timeout=60))
        metrics = await client.metrics()
    reusable = one.done.usage.prompt_tokens + one.done.usage.completion_tokens
    assert [(e.tier, e.tokens) for e in summary.bank] == [("durable", reusable)]
    assert health.bank_tiers == ("ram", tier)
    assert two.done.cache.source == "bank" and two.done.usage.cached_tokens == reusable
    assert two.done.cache.restore_ms > 0
    assert metrics.value("infernode_bank_restores_total", tier="durable") == 1

    cold = await make_node(fresh_server=True, threads=1, n_slots=1, bank_ram_bytes=0)
    await ask(cold.url, "old", "remember this conversation")
    await ask(cold.url, "other", "take the only slot")
    recomputed = await ask(cold.url, "old", "and now?")
    assert recomputed.done.cache.source == "none" and recomputed.done.usage.cached_tokens == 0
    assert two.text == recomputed.text and two.text


async def test_no_slot_thread_waits_on_the_event_loop_for_an_object_store_read(
    make_node, monkeypatch
):
    """Given snapshots only in the object store, when a restarted node restores one, then it
    was fetched on the event loop: no slot thread ran an object-store call."""
    callers: list[str] = []
    real_call = ObjectStoreBackend._call

    def watched(self, coro):  # every blocking object-store call, and the thread it ran on
        callers.append(threading.current_thread().name)
        return real_call(self, coro)

    monkeypatch.setattr(ObjectStoreBackend, "_call", watched)
    first = await make_node(fresh_server=True, threads=1, bank_object_store=True)
    await ask(first.url, "remote", "keep this in the object store")
    await committer(first).wait_handled(1)
    await first.stop()  # finishes queued durable writes
    second = await make_node(url=first.url, threads=1, bank_object_store=True)
    async with InfernodeClient(second.url) as client:
        two = await client.ask("remote", "and now?", sampling=GREEDY, max_tokens=8, timeout=60)
    assert two.cache.source == "bank"
    assert "bank-writer" in callers, "the spy saw no object-store call at all"
    assert [c for c in callers if c.startswith("slot-")] == []


async def test_a_durable_snapshot_of_another_model_is_never_restored(
    make_node, tmp_path: Path, tiny_model: Path
):
    """Given a durable snapshot made with one model, when the node restarts on another model,
    then the old session's turn computes from scratch and names model_mismatch."""
    bank = tmp_path / "bank"
    first = await make_node(fresh_server=True, threads=1, bank_dir=bank)
    await ask(first.url, "switch", "hello there")
    await committer(first).wait_handled(1)
    await first.stop()
    other_model = write_llama_gguf(tmp_path / "other.gguf", seed=99)
    config = NodeConfig(nats_url=first.url, data_dir=tmp_path / "other-node", model=other_model,
                        threads=1, bank_dir=bank)
    async with Node(config) as other:
        two = await ask(other.url, "switch", "and now?")
    assert two.done.cache.source == "none" and two.done.cache.miss_reason == "model_mismatch"
    assert two.done.usage.cached_tokens == 0


async def test_deleting_a_session_forgets_its_bank_entries_in_ram_and_durable_tiers(
    make_node, tmp_path: Path, nc
):
    """Given sessions banked in RAM, a directory and the object store, when one is deleted,
    then its entries are gone from every tier and the other session's remain."""
    bank = tmp_path / "bank"
    node = await make_node(n_slots=1, threads=1, bank_dir=bank, bank_object_store=True)
    await ask(node.url, "doomed", "short lived")
    await ask(node.url, "kept", "long lived")
    await committer(node).wait_handled(2)
    durable = node.engine.bank.durable
    await asyncio.wrap_future(durable.flush())
    store = await nc.jetstream().object_store(S.bank_bucket)

    async def objects(session: str) -> list[str]:
        infos = await store.list(ignore_deletes=True)
        return [i.name for i in infos if i.name.startswith(session + "/")]

    assert list((bank / "doomed").glob("*.kv")) and await objects("doomed")
    async with InfernodeClient(node.url) as client:
        await client.delete("doomed")
    assert not (bank / "doomed").exists() and await objects("doomed") == []
    assert node.engine.bank.session_entries("doomed") == []
    assert list((bank / "kept").glob("*.kv")) and len(await objects("kept")) == 2
    assert [e["tier"] for e in node.engine.bank.session_entries("kept")] == ["ram+durable"]


def test_a_snapshot_file_cut_short_by_a_crash_is_skipped_and_never_indexed(tmp_path: Path):
    """Given a half-written temporary file and a file that is not a snapshot, when the durable
    index is rebuilt, then neither is indexed and the leftover is removed."""
    session_dir = tmp_path / "bank" / "s1"
    session_dir.mkdir(parents=True)
    (session_dir / ("a" * 64 + ".part")).write_bytes(b"INFKV001 half")
    (session_dir / ("b" * 64 + ".kv")).write_bytes(b"not a snapshot at all")
    tier = DurableTier([DirectoryBackend(tmp_path / "bank")])
    try:
        assert tier.open() == 0 and tier.entries("s1") == []
    finally:
        tier.close()
    assert not list(session_dir.glob("*.part"))


def _snapshot(session: str, first: int, nbytes: int = 100) -> tuple[SnapshotMeta, bytes]:
    meta = SnapshotMeta(session=session, tokens=(first, first + 1), nbytes=nbytes,
                        model_id="m")
    return meta, bytes([first % 256]) * nbytes


def test_the_durable_tier_holds_its_byte_cap_by_evicting_the_least_recently_used(
    tmp_path: Path,
):
    """Given a durable tier capped at three snapshots' bytes, when a fourth is written after
    the oldest one was restored, then the least recently used one (not the oldest) is deleted
    from the index and the disk; a snapshot larger than the cap is never written; a restart
    under a smaller cap evicts by the recorded times (restores since the write are not on
    disk)."""
    root = tmp_path / "bank"
    tier = DurableTier([DirectoryBackend(root)], max_bytes=300)
    try:
        a, b, c, d = (_snapshot(s, i) for i, s in enumerate("abcd"))
        for n, (meta, data) in enumerate((a, b, c)):
            meta.last_access = 1000.0 + n
            tier.persist(meta, data).result(30)
        a[0].last_access = 2000.0  # a restore of "a": now "b" is the least recently used
        tier.persist(*d).result(30)
        assert sorted(s for s in "abcd" if tier.entries(s)) == ["a", "c", "d"]
        assert not (root / "b").exists() and (root / "a").exists()
        stats = tier.stats()
        assert stats["bytes"] == 300 and stats["evictions"] == 1
        assert not tier.persist(*_snapshot("e", 9, nbytes=301)).result(30)
        assert tier.entries("e") == [] and not (root / "e").exists()
    finally:
        tier.close()
    smaller = DurableTier([DirectoryBackend(root)], max_bytes=200)
    try:
        assert smaller.open() == 2
        assert sorted(s for s in "acd" if smaller.entries(s)) == ["c", "d"]
        assert sum(1 for _ in root.glob("*/*.kv")) == 2
    finally:
        smaller.close()


async def test_indexing_moved_sessions_never_holds_the_lock_the_event_loop_takes(
    nc, monkeypatch
):
    """Given snapshots in the object store, when the tier indexes them (a node gaining
    partitions) while the event loop reads the index (a turn's durable lookup, metrics),
    then the loop's reads answer at once instead of waiting out the scan's call timeout."""
    monkeypatch.setattr("actors.engine.bank.objects.CALL_TIMEOUT_S", 3.0)
    store = await open_object_store(nc.jetstream(), S.bank_bucket)
    backend = ObjectStoreBackend(store, asyncio.get_running_loop(), nc.jetstream(), S)
    writer = DurableTier([backend])
    try:
        await asyncio.wrap_future(writer.persist(*_snapshot("moved", 1)))
    finally:
        await asyncio.to_thread(writer.close)
    scanning = asyncio.Event()
    real_list = store.list

    async def listing(**kwargs):  # the scan has begun and waits on this loop
        scanning.set()
        return await real_list(**kwargs)

    monkeypatch.setattr(store, "list", listing)
    tier = DurableTier([backend])
    try:
        opened = asyncio.create_task(asyncio.to_thread(tier.open, frozenset({"moved"})))
        await wait_for_event(scanning, what="the index scan")
        t0 = time.perf_counter()
        tier.entries("moved"), tier.stats()  # on the loop, as banking and metrics read it
        assert time.perf_counter() - t0 < 1.0, "the loop waited for a lock held by the scan"
        assert await asyncio.wait_for(opened, 10) == 1
        assert [m.session for m in tier.entries("moved")] == ["moved"]
    finally:
        await asyncio.to_thread(tier.close)
