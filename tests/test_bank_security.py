"""Attacks on the KV bank: tampered snapshots and model files, and the cross-tenant prefix
side channel.

- Bytes flipped in a ``--bank-dir`` snapshot, or an object overwritten in the object store,
  are never restored: the turn misses with ``corrupt``, answers what a cold compute does, and
  the snapshot is dropped.
- A model file whose tensor data changed (same size, same first MiB) has another identity,
  so the old model's states are not restored into it.
- Snapshot files (whole conversations as token ids) are the node user's only.
- An agent's ``cached_tokens`` for a prefix another agent sent equal those for a prefix nobody
  sent (same cache source, same miss reason): nothing is learned from the shared bank; only
  the members of a share group an operator declared share.
"""

from __future__ import annotations

import asyncio
import shutil
import stat
from pathlib import Path

import gguf
import httpx
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from actors.engine.bank.domains import LOCAL_USER, ShareGroups, parse_share_groups
from actors.engine.bank.durable import DirectoryBackend, DurableTier
from actors.engine.bank.meta import SnapshotMeta
from actors.engine.bank.objects import ObjectStoreBackend, open_object_store
from actors.engine.engine import SlotEngine
from actors.engine.gguf_info import model_id_of
from actors.engine.interface import CancelToken, TurnOutcome, TurnSpec
from actors.engine.loader import load_engine
from actors.gateway.sessions import node_session, stateless_id
from node.config import ConfigError, NodeConfig
from node.demo_model import ModelShape, write_llama_gguf
from schemas.chat import ChatMessage, SamplingParams
from schemas.records import ReplyParams
from schemas.subjects import Subjects

S = Subjects()
GREEDY = SamplingParams(temperature=0.0)
MIB = 1 << 20


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def spec(session: str, messages: list[ChatMessage], ids: dict[int, tuple[int, ...]] | None = None,
         ) -> TurnSpec:
    return TurnSpec(
        session=session,
        turn_id="t",
        messages=tuple(messages),
        assistant_tokens=ids or {},
        params=ReplyParams(sampling=GREEDY, max_tokens=6),
    )


async def run(engine: SlotEngine, s: TurnSpec) -> TurnOutcome:
    return await engine.run_turn(s, lambda text: None, CancelToken())


EMBEDDED = ShareGroups(default=LOCAL_USER)
"""The share groups of an engine loaded for the embedded server (no nats_url), as here."""


def engine_on(model: Path, **settings: object) -> SlotEngine:
    settings.setdefault("n_slots", 1)
    return load_engine(NodeConfig(model=model, threads=1, verify_restore=False, **settings))


FIRST = [ChatMessage(role="system", content="You list animals. " * 6), user("three animals")]


async def bank_first_turn(engine: SlotEngine, tier: DurableTier) -> tuple[list, dict]:  # type: ignore[type-arg]
    """Session ``victim``'s first turn, committed to ``tier``: its next turn's history."""
    engine.bank.attach(tier)  # type: ignore[union-attr]
    try:
        one = await run(engine, spec("victim", FIRST))
        assert (await engine.snapshot("victim", one.token_hash, wait_s=30)).stored
        await asyncio.wrap_future(tier.flush())
    finally:
        engine.bank.attach(None)  # type: ignore[union-attr]
    history = [*FIRST, ChatMessage(role="assistant", content=one.text), user("two more")]
    return history, {2: one.completion_ids or ()}


async def bank_in_directory(model: Path, root: Path) -> tuple[list, dict]:  # type: ignore[type-arg]
    """``bank_first_turn`` on a fresh engine over a directory tier at ``root``, then closed."""
    first = engine_on(model)
    tier = DurableTier([DirectoryBackend(root)], groups=EMBEDDED)
    try:
        return await bank_first_turn(first, tier)
    finally:
        tier.close()
        await first.close()


async def second_turn(
    model: Path, tier: DurableTier, history: list, ids: dict  # type: ignore[type-arg]
) -> tuple[TurnOutcome, int]:
    """The victim's next turn on a fresh engine over ``tier`` (empty RAM), and the
    snapshots the durable tier holds after it."""
    engine = engine_on(model)
    assert await asyncio.to_thread(tier.open) == 1
    engine.bank.attach(tier)  # type: ignore[union-attr]
    try:
        out = await run(engine, spec("victim", history, ids))
        await asyncio.wrap_future(tier.flush())  # the discarded snapshot's delete
        left = tier.stats()["entries"]
    finally:
        await asyncio.to_thread(tier.close)
        await engine.close()
    return out, left


async def cold_answer(model: Path, history: list, ids: dict) -> TurnOutcome:  # type: ignore[type-arg]
    engine = engine_on(model, bank_ram_bytes=0)
    try:
        return await run(engine, spec("cold", history, ids))
    finally:
        await engine.close()


def flip_kv_bytes(raw: bytes, at: int) -> bytes:
    """``raw`` with 64 bytes from ``at`` inverted: the size stays the same."""
    out = bytearray(raw)
    for i in range(at, at + 64):
        out[i] ^= 0xFF
    return bytes(out)


async def test_flipped_bytes_in_a_snapshot_file_are_never_restored(tiny_model: Path, tmp_path):
    """Given a committed snapshot in a --bank-dir whose KV bytes were flipped (size intact),
    when the session continues on a restarted engine, then nothing is restored: the miss says
    corrupt, the answer is the cold compute's, and the file is gone."""
    root = tmp_path / "bank"
    history, ids = await bank_in_directory(tiny_model, root)
    (path,) = (root / "victim").glob("*.kv")
    raw = path.read_bytes()
    path.write_bytes(flip_kv_bytes(raw, len(raw) // 2))
    again = DurableTier([DirectoryBackend(root)], groups=EMBEDDED)
    out, left = await second_turn(tiny_model, again, history, ids)
    cold = await cold_answer(tiny_model, history, ids)
    assert out.cache.source == "none" and out.cache.miss_reason == "corrupt"
    assert out.usage.cached_tokens == 0
    assert out.completion_ids == cold.completion_ids
    assert left == 0 and not path.exists()


async def test_an_overwritten_object_store_snapshot_is_never_restored(
    tiny_model: Path, nc: Client
):
    """Given a committed snapshot in the JetStream object store whose bytes object was
    overwritten with others of the same size, when the session continues on a restarted
    engine, then nothing is restored: the miss says corrupt, the answer is the cold
    compute's, and the snapshot's objects are deleted."""
    js = nc.jetstream()
    store = await open_object_store(js, S.bank_bucket)
    loop = asyncio.get_running_loop()

    def tier() -> DurableTier:
        return DurableTier([ObjectStoreBackend(store, loop, js, S)], groups=EMBEDDED)

    first = engine_on(tiny_model)
    written = tier()
    try:
        history, ids = await bank_first_turn(first, written)
    finally:
        await asyncio.to_thread(written.close)
        await first.close()
    (name,) = [n for n in await live_objects(store) if n.endswith(".kv")]
    raw = (await store.get(name)).data or b""
    await store.put(name, flip_kv_bytes(raw, len(raw) // 3))
    out, left = await second_turn(tiny_model, tier(), history, ids)
    cold = await cold_answer(tiny_model, history, ids)
    assert out.cache.source == "none" and out.cache.miss_reason == "corrupt"
    assert out.usage.cached_tokens == 0
    assert out.completion_ids == cold.completion_ids
    assert left == 0 and await live_objects(store) == []


async def live_objects(store: ObjectStore) -> list[str]:
    """Names of the objects in ``store`` that are not deleted."""
    try:
        infos = await store.list(ignore_deletes=True)
    except NotFoundError:  # nothing left at all
        return []
    return [i.name for i in infos if not i.deleted]


def _weights_changed_past_the_first_mib(model: Path, copy: Path) -> None:
    """Copy ``model`` with one byte of its last tensor changed, beyond its first MiB."""
    shutil.copyfile(model, copy)
    tensor = next(t for t in gguf.GGUFReader(model).tensors if t.name == "output.weight")
    at = int(tensor.data_offset) + int(tensor.n_bytes) // 2
    assert at > MIB
    with copy.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))


async def test_a_model_file_with_other_weights_restores_nothing_of_the_old_one(tmp_path: Path):
    """Given a model whose tensor data changed past its first MiB (same size, same header),
    then its identity differs and a session banked on the old file is not restored into it."""
    shape = ModelShape(n_embd=256, n_layer=2, n_head=4, n_ff=512)
    model = write_llama_gguf(tmp_path / "model.gguf", shape)
    other = tmp_path / "other.gguf"
    _weights_changed_past_the_first_mib(model, other)
    with model.open("rb") as a, other.open("rb") as b:
        assert a.read(MIB) == b.read(MIB)
    assert model.stat().st_size == other.stat().st_size
    assert model_id_of(model) != model_id_of(other)
    root = tmp_path / "bank"
    history, ids = await bank_in_directory(model, root)
    again = DurableTier([DirectoryBackend(root)], groups=EMBEDDED)
    engine = engine_on(other)
    assert await asyncio.to_thread(again.open) == 1
    engine.bank.attach(again)  # type: ignore[union-attr]
    try:
        out = await run(engine, spec("victim", history, ids))
    finally:
        again.close()
        await engine.close()
    assert out.cache.source == "none" and out.cache.miss_reason == "model_mismatch"


def test_snapshot_files_are_readable_by_the_node_user_only(tmp_path: Path):
    """Given the directory tier writes a snapshot (a whole conversation as token ids), then
    the file is 0600 and its directories 0700."""
    root = tmp_path / "bank"
    tier = DurableTier([DirectoryBackend(root)], groups=EMBEDDED)
    meta = SnapshotMeta(session="private", tokens=(1, 2, 3), nbytes=8, model_id="m")
    try:
        tier.persist(meta, b"\1" * 8).result(30)
    finally:
        tier.close()
    (path,) = (root / "private").glob("*.kv")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


# -- the cross-tenant prefix side channel ---------------------------------------------------
SECRET = "Vault code 48213377. Never say it. "
GUESS_NOBODY_SENT = "Locker key 90051264. Keep it. "
FILLER = "Answer in one word, plainly, without any preamble or comment at all. " * 3


async def _chat(http: httpx.AsyncClient, key: str, session: str, system: str) -> dict:  # type: ignore[type-arg]
    body = {"model": "any", "temperature": 0, "max_tokens": 3, "messages": [
        {"role": "system", "content": system + FILLER}, {"role": "user", "content": "go"}]}
    r = await http.post("/chat/completions", json=body, headers={
        "Authorization": f"Bearer {key}", "X-Session-Id": session})
    assert r.status_code == 200, r.text
    out = r.json()
    return {"cached": out["usage"]["prompt_tokens_details"]["cached_tokens"],
            "prompt": out["usage"]["prompt_tokens"], "source": out["infernode"]["cache_source"],
            "miss": out["infernode"]["miss_reason"]}


async def test_an_agent_learns_nothing_from_the_cache_about_another_agents_prompt(
    make_node, tmp_path: Path
):
    """Given alice sent a system prompt holding a secret, when bob (another API key) sends
    that prompt and one nobody sent, then both come back with the same cached_tokens, cache
    source and miss reason: the bank shares nothing across agents."""
    keys = tmp_path / "keys"
    keys.write_text("alice-key-0123456789 alice\nbob-key-0123456789ab bob\n")
    node = await make_node(openai_port=0, api_keys=keys, n_slots=1)
    base = f"http://127.0.0.1:{node.gateway.port}/v1"
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        alice = await _chat(http, "alice-key-0123456789", "a1", SECRET)
        nobody = await _chat(http, "bob-key-0123456789ab", "b1", GUESS_NOBODY_SENT)
        guessed = await _chat(http, "bob-key-0123456789ab", "b2", SECRET)
        again = await _chat(http, "alice-key-0123456789", "a2", SECRET)
    assert alice["prompt"] == guessed["prompt"] > 64
    assert guessed == {**nobody, "prompt": guessed["prompt"]}
    assert guessed["cached"] == 0 and guessed["source"] == "none"
    assert again["source"] == "bank" and again["cached"] > 48  # alice's own sessions share


async def test_a_declared_share_group_shares_prefixes_among_its_members_only(tiny_model: Path):
    """Given --bank-share-groups team=alice,bob, then bob restores the prefix alice banked,
    while carol (outside the group) and an ungrouped NATS session get none of it."""
    engine = engine_on(tiny_model, bank_share_groups="team=alice,bob")
    system = ChatMessage(role="system", content=SECRET + FILLER)
    try:
        await run(engine, spec("alice_one", [system, user("go")]))
        bob = await run(engine, spec("bob_one", [system, user("go on")]))
        carol = await run(engine, spec("carol_one", [system, user("go on")]))
        loose = await run(engine, spec("b-1", [system, user("go on")]))
    finally:
        await engine.close()
    assert bob.cache.source == "bank" and bob.cache.shared_from == "ram"
    assert bob.usage.cached_tokens > 48
    for outsider in (carol, loose):
        assert outsider.cache.source == "none" and outsider.usage.cached_tokens == 0


def test_trust_domains_follow_the_agent_and_the_declared_groups():
    """An agent's gateway sessions share one domain; other sessions are alone; a declared
    group (by agent name or session glob) joins its members and nobody else."""
    plain = parse_share_groups("")
    assert plain.domain("alice_a1") == plain.domain("alice_chat-2") != plain.domain("bob_a1")
    assert plain.domain("a-1") != plain.domain("a-2")
    grouped = parse_share_groups("team=alice,bob; mesh=ring-*")
    assert grouped.domain("alice_x") == grouped.domain("bob_y") != grouped.domain("carol_z")
    assert grouped.domain("ring-0") == grouped.domain("ring-7") != grouped.domain("a-1")


def test_a_keyless_gateways_stateless_sessions_are_one_domain_apart_from_every_agent():
    """Without API keys the gateway's stateless sessions (and their forks) share one domain,
    which holds no keyed agent's session and no session a client named itself."""
    plain = parse_share_groups("")
    one, two = stateless_id(""), stateless_id("")
    assert plain.domain(one) == plain.domain(two) == plain.domain(f"{one}-3f2a")
    assert plain.domain(node_session("alice", stateless_id("alice"))) != plain.domain(one)
    assert plain.domain(node_session("alice", one)) != plain.domain(one)
    assert plain.domain("editme") != plain.domain(one)


async def test_on_the_embedded_server_sessions_no_agent_claims_are_one_domain(tiny_model: Path):
    """The embedded server has one client user, so its un-prefixed sessions (a keyless
    gateway's forks among them) share; gateway agents stay apart; a node joining another
    server (nats_url) cannot tell its users apart and shares nothing across sessions."""
    embedded = engine_on(tiny_model)
    joined = engine_on(tiny_model, nats_url="nats://127.0.0.1:4222")
    try:
        local = embedded.bank.groups  # type: ignore[union-attr]
        assert local.domain("chat-1") == local.domain("editme-3f2a") == LOCAL_USER
        assert local.domain("alice_x") != local.domain("chat-1") != local.domain("bob_y")
        apart = joined.bank.groups  # type: ignore[union-attr]
        assert apart.domain("chat-1") != apart.domain("editme-3f2a")
    finally:
        await embedded.close()
        await joined.close()


def test_a_malformed_share_groups_setting_is_refused_with_the_fix():
    """A group without '=' or patterns, a bad pattern or a repeated name stops the start with
    a sentence naming the setting and its form."""
    for bad in ("mesh", "mesh=", "me sh=a", "mesh=a.b", "mesh=a;mesh=b"):
        with pytest.raises(ConfigError, match="bank share group") as refused:
            NodeConfig.from_env({"INFERNODE_BANK_SHARE_GROUPS": bad})
        assert "--bank-share-groups" in str(refused.value)
    assert NodeConfig.from_env({"INFERNODE_BANK_SHARE_GROUPS": "m=a,b"}).bank_share_groups
