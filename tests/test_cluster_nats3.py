"""Three nodes on a 3-server NATS cluster with JetStream replicas 3: nodes and servers die.

Each node (``infernode up --replicas 3``) knows every server's URL and fails over between
them. Everything is asserted from the record stream, which outlives every kill:

- A node killed with SIGKILL: the other two take its partitions and restore its sessions
  from the bank's object store; every accepted prompt is answered once, generations stay
  contiguous, and no session has records from two nodes inside one lease.
- A prompt admission defers just as the server leading its partition's consumer dies is
  offered again within seconds, not after the consumer's ack wait.
- A NATS server killed with SIGKILL that does not lead the intake stream, then (once it is
  back and caught up) the one that leads it: prompts in flight across both kills are all
  answered once, nothing is duplicated, and the streams elect a new leader.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from actors.admission import ACK_WAIT_S, Admission
from actors.leases import PartitionLeases
from node.streams import ensure_streams
from schemas.records import CommitRecord, UserRecord
from schemas.subjects import Subjects, partition_of
from tests.helpers import EventCollector
from tests.nats_cluster import NatsCluster, poll
from tests.support.cluster import (
    TTL,
    Written,
    assert_answered_once,
    assert_one_writer_at_a_time,
    by_session,
    prompt,
    record_log,
)
from tests.support.node_process import NodeProcess

S = Subjects()
SESSIONS = [f"c3-{i}" for i in range(12)]
NODE_FLAGS = ("--bank-object-store", "--slots", "12", "--replicas", "3")
"""A slot per session (each first turn is banked as it commits) and three copies of every
stream, the lease bucket and the bank."""


async def start_nodes(
    cluster: NatsCluster, tmp_path: Path, model: Path, ttl: str
) -> list[NodeProcess]:
    """Three `infernode up` processes, each given every server's URL; the first starts alone,
    so it holds every partition before the others join."""
    flags = ("--lease-ttl-s", ttl, *NODE_FLAGS)
    first = await NodeProcess.up(cluster.url, tmp_path / "a", model, "--node-id", "a", *flags)
    rest = await asyncio.gather(*(
        NodeProcess.up(cluster.url, tmp_path / n, model, "--node-id", n, *flags)
        for n in ("b", "c")
    ))
    return [first, *rest]


async def stop_nodes(nodes: list[NodeProcess], logs: Path) -> None:
    """Stop the nodes still running; each node's output is left in ``logs`` (pytest keeps
    the last runs' temporary folders), where a failure is read."""
    for node in nodes:
        if node.proc.returncode is None:
            await node.terminate()
    for name, node in zip("abc", nodes, strict=False):
        (logs / f"node-{name}.log").write_text("".join(node.lines))


async def publish_round(nc: Client, round_: int, max_tokens: int = 3) -> list[str]:
    """One prompt per session, published durably; their idempotency keys."""
    keys = []
    for session in SESSIONS:
        body = prompt(f"{session} round {round_}: what now?", max_tokens)
        keys.append(json.loads(body)["idempotency_key"])
        await nc.jetstream().publish(S.prompt(session), body)
    return keys


async def committed(nc: Client, turns: int, timeout: float = 90) -> dict[str, Written]:
    """The record log once every session has ``turns`` commits (read again until then: the
    stream outlives any server kill, events on the bus do not)."""
    def done(log: dict[str, Written]) -> bool:
        return all(
            sum(isinstance(r, CommitRecord) for _, r in log.get(s, [])) >= turns
            for s in SESSIONS
        )

    async def read() -> dict[str, Written]:
        return by_session(await record_log(nc))

    return await poll(read, done, timeout, f"{turns} commits in every session")


def assert_accepted_equals_answered(log: dict[str, Written], published: list[str]) -> None:
    """Every published prompt is one user record (none lost, none twice), and every user
    record is answered by exactly one commit, generations 1, 2, 3… per session."""
    keys = Counter(r.idempotency_key for s in SESSIONS for _, r in log[s]
                   if isinstance(r, UserRecord))
    assert set(keys) == set(published), "a published prompt was not recorded, or vice versa"
    assert {k: n for k, n in keys.items() if n > 1} == {}, "a prompt was recorded twice"
    for session in SESSIONS:
        assert_answered_once(log[session], session)
        assert_one_writer_at_a_time(log[session], session)


def moved_turns(log: dict[str, Written]) -> set[str]:
    """Turn ids of the first commit each session made on a node other than its last writer."""
    out = set()
    for session in SESSIONS:
        writer = None
        for node, record in log[session]:
            if isinstance(record, CommitRecord) and writer is not None and node != writer:
                out.add(record.turn_id)
            writer = node if isinstance(record, CommitRecord) else writer
    return out


def owners(log: dict[str, Written]) -> Counter[str | None]:
    """How many sessions each node wrote last to."""
    return Counter(log[s][-1][0] for s in SESSIONS)


@pytest.fixture
async def client(nats_cluster: NatsCluster):  # type: ignore[no-untyped-def]
    """A client that knows every server of the cluster (and fails over between them)."""
    nc = await nats.connect(servers=nats_cluster.urls, name="test-client",
                            reconnect_time_wait=0.2, max_reconnect_attempts=-1)
    yield nc
    await nc.close()


# -- a node dies ------------------------------------------------------------------------------
@pytest.mark.timeout(240)
async def test_a_killed_nodes_sessions_move_to_the_two_others_on_three_servers_from_the_bank(
    nats_cluster: NatsCluster, client: Client, tiny_model: Path, tmp_path: Path
):
    """Given three nodes with --replicas 3 on three servers and 12 sessions each with a turn
    banked, when the node holding them is SIGKILLed while their second prompts arrive, the
    two others take its partitions, every accepted prompt is answered once with contiguous
    generations, each session's writers follow one another without overlap, and every turn
    that moved restored the session's KV from the bank."""
    nodes = await start_nodes(nats_cluster, tmp_path, tiny_model, TTL)
    accepted = await EventCollector.start(client, S.events("*", "accepted"))
    done = await EventCollector.start(client, S.events("*", "done"))
    banked = await EventCollector.start(client, f"$O.{S.bank_bucket}.M.>")
    try:
        published = await publish_round(client, 1)
        first = await committed(client, 1)
        # Two objects per snapshot: its bytes, then the metadata that makes it visible.
        await banked.wait_until(lambda ms: len(ms) >= 2 * len(SESSIONS), timeout=60)
        victim_id, held = owners(first).most_common(1)[0]
        victim = nodes[ord(victim_id or "a") - ord("a")]
        published += await publish_round(client, 2, max_tokens=16)
        await accepted.wait_until(lambda ms: len(ms) > len(SESSIONS), timeout=60)
        await victim.kill()
        log = await committed(client, 2)
        assert_accepted_equals_answered(log, published)
        moved = moved_turns(log)
        assert moved, f"every turn of the {held} sessions on {victim_id} ended before the kill"
        sources = {d["turn_id"]: d["cache"]["source"] for d in map(json.loads,
                   (m.data for m in done.messages))}
        assert {sources[t] for t in moved} == {"bank"}, sources
    finally:
        await stop_nodes(nodes, tmp_path)


# -- a NATS server dies: not the intake's leader, then the leader ----------------------------
@pytest.mark.timeout(240)
async def test_killing_a_follower_server_then_the_intake_leader_loses_and_repeats_nothing(
    nats_cluster: NatsCluster, client: Client, tiny_model: Path, tmp_path: Path
):
    """Given three nodes with --replicas 3 on three servers and 12 sessions, when a server
    that does not lead the intake stream is SIGKILLed with prompts in flight, and once it is
    back and caught up the intake's leader is SIGKILLed with prompts in flight, another
    server leads the intake, and every accepted prompt is answered once with contiguous
    generations and no session written by two nodes at once."""
    nodes = await start_nodes(nats_cluster, tmp_path, tiny_model, "10")
    try:
        published = await publish_round(client, 1)
        await committed(client, 1)

        leader = await nats_cluster.stream_leader(client, S.prompt_stream)
        follower = next(n for n in nats_cluster.servers if n != leader)
        await holds_node_connections(nats_cluster, follower)
        published += await publish_round(client, 2, max_tokens=16)
        await nats_cluster.kill(follower)
        await committed(client, 2)
        assert await nats_cluster.stream_leader(client, S.prompt_stream) == leader

        await nats_cluster.servers[follower].restart()
        await nats_cluster.wait_for_meta_leader()
        await caught_up(client, nats_cluster)
        await holds_node_connections(nats_cluster, leader)
        published += await publish_round(client, 3, max_tokens=16)
        await nats_cluster.kill(leader)
        new_leader = await nats_cluster.wait_for_stream_leader(client, S.prompt_stream)
        assert new_leader != leader
        log = await committed(client, 3)
        assert_accepted_equals_answered(log, published)
        assert all(node.proc.returncode is None for node in nodes), "a node died"
    finally:
        await stop_nodes(nodes, tmp_path)


async def holds_node_connections(cluster: NatsCluster, server: str) -> None:
    """The nodes' connections are spread over the servers they know (the client shuffles the
    URLs), so killing ``server`` makes some of them fail over; check it holds one."""
    names = await cluster.client_names(server)
    assert any(n.startswith("infernode-") for n in names), f"{server} holds no node's: {names}"


async def caught_up(nc: Client, cluster: NatsCluster, timeout: float = 30) -> None:
    """Wait until every replica of the node's streams is current on every running server."""
    streams = (S.prompt_stream, S.record_stream, S.kv_stream(S.lease_bucket),
               S.bank_object_stream)

    async def lagging() -> list[str]:
        out = []
        for stream in streams:
            info = await nc.jetstream().stream_info(stream)
            peers = info.cluster.replicas if info.cluster else None
            if not peers or len(peers) != cluster.size - 1:
                out.append(f"{stream}: {peers}")
                continue
            out += [f"{stream}@{p.name}" for p in peers if not p.current or p.offline]
        return out

    await poll(lagging, lambda behind: not behind, timeout, "every replica caught up")



# -- a deferral sent while the server leading the consumer is lost ---------------------------
@pytest.mark.timeout(90)
async def test_a_prompt_deferred_as_its_consumers_leader_dies_is_offered_again_within_seconds(
    nats_cluster: NatsCluster,
):
    """Given the intake on three servers and a prompt pulled from its partition's consumer,
    when the server leading that consumer is SIGKILLed and admission defers the prompt at
    once (its record log was unavailable), the prompt is offered again within seconds of a
    new leader, not after the consumer's 30 s ack wait: the deferral is sent until a server
    confirms it."""
    session = "deferred"
    partition = partition_of(session, 16)
    durable = S.admission_consumer(partition)
    setup = await nats.connect(servers=nats_cluster.urls)
    try:
        await ensure_streams(setup.jetstream(), S, 1 << 20, partitions=16, replicas=3)
        await setup.jetstream().add_consumer(S.prompt_stream, ConsumerConfig(
            durable_name=durable, filter_subject=S.intake(partition),
            ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S,
        ))
        await setup.jetstream().publish(S.prompt(session), prompt("hello"))
        info = await setup.jetstream().consumer_info(S.prompt_stream, durable)
        assert info.cluster is not None and info.cluster.leader
        leader = info.cluster.leader
    finally:
        await setup.close()
    # Admission's connection is on a server that survives, as it is for most nodes.
    survivor = next(s.url for n, s in nats_cluster.servers.items() if n != leader)
    nc = await nats.connect(servers=[survivor], reconnect_time_wait=0.2)
    try:
        sub = await nc.jetstream().pull_subscribe_bind(durable, S.prompt_stream)
        [msg] = await sub.fetch(1, timeout=10)
        leases = PartitionLeases(nc, S, "t", 16, 10.0, 3, balance=True)
        admission = Admission(nc, S, 1 << 20, leases, b"seal secret")
        await nats_cluster.kill(leader)
        deferred = asyncio.get_running_loop().time()
        await admission._defer(msg, session, "the record log is unavailable")

        async def again() -> list[Msg]:
            return await sub.fetch(1, timeout=1)

        redelivered = await poll(again, bool, ACK_WAIT_S / 2, "the deferred prompt again")
        assert redelivered[0].metadata.sequence.stream == msg.metadata.sequence.stream
        assert asyncio.get_running_loop().time() - deferred < ACK_WAIT_S / 2
    finally:
        await nc.close()
