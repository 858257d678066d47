"""Many nodes on one NATS: sessions partitioned, fenced, and moved by restore when a node dies.

- The node computes a session's partition as the intake stream does (NATS's partition()).
- Two nodes on one nats-server, balanced: every prompt answered once, generations
  contiguous, each session's records written by one node (the hazard: two nodes split its
  prompts). The tests of a paused, killed or stopped node run B as a standby
  (``--no-balance``), so A serves every session until it goes.
- A node paused (SIGSTOP) past its lease resumes and writes nothing to the sessions another
  node took over.
- A node killed (SIGKILL): the survivor takes its partitions, rebuilds the sessions from the
  record log and restores their KV from the bank's object store; every prompt answered once.
- A node stopped with SIGTERM gives its leases back once its sessions are banked: another
  node takes them at once (not after the TTL) and restores them from the bank.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from collections import Counter
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from actors.admission import Admission
from actors.leases import PartitionLeases
from node.client import InfernodeClient
from node.config import NodeConfig
from node.nats_server import EmbeddedNats
from node.streams import ensure_streams
from node.wiring import node_identity
from schemas.chat import SamplingParams
from schemas.internal import AdmitReply, AdmitRequest
from schemas.records import CommitRecord
from schemas.subjects import ABORTED_HEADER, Subjects, partition_of
from tests.helpers import EventCollector, lease_owners_until, until
from tests.support.cluster import (
    TTL,
    assert_answered_once,
    assert_one_writer_at_a_time,
    by_session,
    commits_of,
    prompt,
    record_log,
)
from tests.support.node_process import NodeProcess

S = Subjects()
GREEDY = SamplingParams(temperature=0.0)
GAINED = re.compile(r'"event": "leases_gained"')
LOST = re.compile(r'"event": "leases_lost"')


# -- ownership --------------------------------------------------------------------------------
async def test_the_node_computes_the_partition_the_intake_stream_stores_each_prompt_under(nc):
    """Given the intake stream, a prompt for any session is stored under the partition that
    ``partition_of`` names for it, so a node knows which sessions its leases cover."""
    js = nc.jetstream()
    await ensure_streams(js, S, 1 << 20, partitions=16)
    sessions = [f"s-{i}" for i in range(64)] + ["A", "session_with-every_kind-9"]
    for session in sessions:
        ack = await js.publish(S.prompt(session), b"{}")
        stored = await js.get_msg(S.prompt_stream, ack.seq)
        assert stored.subject == f"{S.intake(partition_of(session, 16))[:-1]}{session}"
    assert len({partition_of(s, 16) for s in sessions}) == 16


async def test_another_partition_count_on_the_same_intake_is_refused_with_the_fix(nc):
    """Given an intake made for 16 partitions, a node configured for 8 is refused with a
    sentence naming --partitions, and the stream keeps its 16."""
    js = nc.jetstream()
    await ensure_streams(js, S, 1 << 20, partitions=16)
    with pytest.raises(ValueError, match="--partitions"):
        await ensure_streams(js, S, 1 << 20, partitions=8)
    info = await js.stream_info(S.prompt_stream)
    assert info.config.subject_transform is not None
    assert "partition(16,1)" in info.config.subject_transform.dest


async def test_a_lease_is_taken_once_renewed_and_taken_back_by_the_same_node_after_a_restart(
    nc, nats_server: EmbeddedNats
):
    """Given node A holding every partition, node B gets none; when A's process is gone
    without giving them back, A restarted under its id takes them back at once (before their
    TTL), and once A stops cleanly B takes them all."""
    # B stands by (no balance): A keeps every partition while it lives.
    a = PartitionLeases(nc, S, "node-a", 4, 30.0, 1, balance=False)
    b = PartitionLeases(nc, S, "node-b", 4, 30.0, 1, balance=False)
    await a.start()
    await b.start()
    assert a.held() == frozenset(range(4)) and b.held() == frozenset()
    revisions = {p: lease.revision for p, lease in a.leases.items()}
    a._stopping.set()  # a process killed: no release, the keys stay until their TTL
    again = PartitionLeases(nc, S, "node-a", 4, 30.0, 1, balance=False)
    await again.start()
    assert again.held() == frozenset(range(4))
    assert all(again.leases[p].revision > revisions[p] for p in range(4))
    await again.stop()
    await b._take_free()
    assert b.held() == frozenset(range(4))
    await b.stop()


class FlakyUser:
    """A partition user whose first gain fails, as a gain does while the server leading a
    stream has died and its successor is not elected yet."""

    def __init__(self) -> None:
        self.served: set[int] = set()
        self.gains: list[frozenset[int]] = []

    async def gain(self, partitions: frozenset[int]) -> None:
        self.gains.append(partitions)
        if len(self.gains) == 1:
            raise TimeoutError("nats: timeout")
        self.served |= partitions

    async def lose(self, partitions: frozenset[int]) -> None:
        self.served -= partitions

    async def hand_over(self, partitions: frozenset[int]) -> None:
        self.served -= partitions


async def test_a_gain_a_user_failed_to_take_is_told_again_until_it_took_it(nc):
    """Given node B holding every partition and node A standing by with a user, when B stops
    and A takes the partitions but the user's first gain fails, A tells it again until the
    user serves all of them (a failed gain no longer leaves partitions held and unserved)."""
    b = PartitionLeases(nc, S, "node-b", 4, 1.0, 1, balance=False)
    a = PartitionLeases(nc, S, "node-a", 4, 1.0, 1, balance=False)
    user = FlakyUser()
    await b.start()
    await a.start()
    a.join(user)
    try:
        await b.stop()
        await until(lambda: user.served == set(range(4)), timeout=10, what="the user serving")
        assert len(user.gains) >= 2 and user.gains[-1] <= frozenset(range(4))
    finally:
        await a.stop()


class TimedUser:
    """A partition user that notes when it served every partition (``time.monotonic()``)."""

    def __init__(self, partitions: int) -> None:
        self.served: set[int] = set()
        self.partitions = partitions
        self.all_served_at: float | None = None

    async def gain(self, partitions: frozenset[int]) -> None:
        self.served |= partitions
        if len(self.served) == self.partitions and self.all_served_at is None:
            self.all_served_at = time.monotonic()

    async def lose(self, partitions: frozenset[int]) -> None:
        self.served -= partitions

    async def hand_over(self, partitions: frozenset[int]) -> None:
        self.served -= partitions


async def test_a_lease_its_holder_stopped_renewing_is_taken_when_it_runs_out_not_a_round_later(
    nats_server: EmbeddedNats, nc: Client, monkeypatch: pytest.MonkeyPatch
):
    """Given node A holding every partition with a 2 s lease and standby B, whose renewal
    rounds are made far apart, when A's connection dies, then B takes the partitions within
    about a TTL of A's death: when the leases run out, not at B's next round."""
    ttl = 2.0
    a_nc = await nats.connect(nats_server.url)
    a = PartitionLeases(a_nc, S, "node-a", 4, ttl, 1, balance=False)
    await a.start()
    monkeypatch.setattr("actors.leases.RENEWALS_PER_TTL", 0.05)  # B's rounds: 40 s apart
    await a_nc.close()  # A renews nothing more: its leases run out within the TTL
    died = time.monotonic()
    b = PartitionLeases(nc, S, "node-b", 4, ttl, 1, balance=False)
    user = TimedUser(4)
    b.join(user)
    await b.start()
    try:
        await until(lambda: user.all_served_at is not None, timeout=ttl + 5,
                    what="B serving every partition")
        assert user.all_served_at is not None and user.all_served_at - died < ttl + 1.0
    finally:
        await b.stop()
        await a.stop()


async def test_a_partition_gained_before_its_intake_can_be_pulled_is_pulled_once_it_can(nc):
    """Given admission holding every partition while the intake stream is not there (a new
    stream leader not yet elected answers the same way), its start does not fail; once the
    stream exists, a prompt published to it reaches the runners within seconds."""
    leases = PartitionLeases(nc, S, "node-a", 4, 10.0, 1, balance=False)
    await leases.start()
    admits: asyncio.Queue[AdmitRequest] = asyncio.Queue()

    async def runner(msg) -> None:  # records nothing: answers as a runner host would
        await admits.put(AdmitRequest.model_validate_json(msg.data))
        await msg.respond(AdmitReply(outcome="recorded", generation=1).model_dump_json().encode())

    await nc.subscribe(S.admit_all(), cb=runner)
    admission = Admission(nc, S, 1 << 20, leases, b"seal secret")
    await admission.start()
    try:
        await ensure_streams(nc.jetstream(), S, 1 << 20, partitions=4)
        await nc.jetstream().publish(S.prompt("late"), prompt("hello"))
        admitted = await asyncio.wait_for(admits.get(), timeout=15)
        assert admitted.session == "late"
    finally:
        await admission.stop()
        await leases.stop()


def test_a_node_keeps_its_id_across_restarts_and_nodes_sharing_a_volume_get_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The id is the same for the same host and data directory (a restart takes its own
    leases back), differs for containers sharing one data volume (compose --scale) and for
    two data directories on one host, and --node-id wins."""
    shared = NodeConfig(data_dir=tmp_path / "data")
    monkeypatch.setattr("socket.gethostname", lambda: "c0ffee.local")
    first = node_identity(shared)
    assert first == node_identity(NodeConfig(data_dir=tmp_path / "data"))
    assert first != node_identity(NodeConfig(data_dir=tmp_path / "other"))
    assert Subjects("infer", first).node == first  # one subject token
    monkeypatch.setattr("socket.gethostname", lambda: "b4dbeef")
    assert node_identity(shared) != first
    assert node_identity(NodeConfig(data_dir=tmp_path / "data", node_id="n-1")) == "n-1"


async def test_health_names_the_answering_node_and_the_partitions_it_owns(make_node):
    """A single node owns every partition, and `health` says which node answered and that
    it holds all 16."""
    node = await make_node()
    async with InfernodeClient(node.url) as client:
        health = await client.health()
    assert health.node == node.node_id and health.node
    assert health.partitions == tuple(range(16))


# -- 2 nodes, one nats-server: the hazard ----------------------------------------------------
@pytest.mark.timeout(180)
async def test_two_nodes_on_one_nats_server_answer_each_prompt_once_from_one_node(
    make_node, nc: Client
):
    """Given two nodes on one nats-server, balanced at 8 partitions each, and 12 sessions
    with 3 prompts each, every prompt is answered by exactly one commit, generations run 1,
    2, 3 per session, each session's records are written by one node (two nodes never split
    a session), and both nodes serve sessions."""
    nodes = await asyncio.gather(
        make_node(bank_ram_bytes=0, lease_ttl_s=2), make_node(bank_ram_bytes=0, lease_ttl_s=2)
    )
    await lease_owners_until(
        nc, lambda o: Counter(o.values()) == {n.node_id: 8 for n in nodes}, timeout=30
    )
    sessions = [f"two-{i}" for i in range(12)]
    commits = await EventCollector.start(nc, S.events("*", "commit"))
    js = nc.jetstream()
    for round_ in range(3):
        for session in sessions:
            await js.publish(S.prompt(session), prompt(f"{session} round {round_}"))
        await commits.wait_until(
            lambda _, r=round_: all(commits_of(commits).get(s, 0) > r for s in sessions),
            timeout=60,
        )
    log = by_session(await record_log(nc))
    for session in sessions:
        assert_answered_once(log[session], session)
        assert len({node for node, _ in log[session]}) == 1, session
    assert {log[s][0][0] for s in sessions} == {n.node_id for n in nodes}


# -- fencing: a paused node ------------------------------------------------------------------
@pytest.mark.timeout(240)
async def test_a_node_paused_past_its_lease_writes_nothing_after_another_node_took_over(
    nats_server: EmbeddedNats, nc: Client, tiny_model: Path, tmp_path: Path
):
    """Given node A serving four sessions with a turn streaming, when A is SIGSTOPped past its
    2 s lease, node B takes the partitions and answers the prompts sent meanwhile; when A is
    SIGCONTed it learns it lost its leases, and no record of A lands after B's."""
    url, js = nats_server.url, nc.jetstream()
    # B stands by (no balance): A serves every session until it is paused.
    flags = ("--lease-ttl-s", TTL, "--ctx", "4096", "--bank-ram-bytes", "0", "--no-balance")
    a = await NodeProcess.up(url, tmp_path / "a", tiny_model, *flags)
    b = await NodeProcess.up(url, tmp_path / "b", tiny_model, *flags)
    sessions = [f"fence-{i}" for i in range(4)]
    commits = await EventCollector.start(nc, S.events("*", "commit"))
    tokens = await EventCollector.start(nc, S.events(sessions[0], "token"))
    stopped = False
    try:
        for session in sessions:
            await js.publish(S.prompt(session), prompt(f"{session}: hello"))
        await commits.wait_until(lambda _: len(commits_of(commits)) == 4, timeout=60)
        await js.publish(S.prompt(sessions[0]), prompt("talk for a long time", 8000))
        await tokens.wait_until(lambda ms: len(ms) > 0, timeout=60)
        a.proc.send_signal(signal.SIGSTOP)
        stopped = True
        await b.wait_for_line(GAINED, timeout=30)
        for session in sessions[1:]:
            await js.publish(S.prompt(session), prompt(f"{session}: who answers now?"))
        await commits.wait_until(
            lambda _: all(commits_of(commits).get(s, 0) >= 2 for s in sessions[1:]), timeout=60
        )
        a.proc.send_signal(signal.SIGCONT)
        stopped = False
        await a.wait_for_line(LOST, timeout=30)
        for session in sessions[1:]:
            await js.publish(S.prompt(session), prompt(f"{session}: and after the pause?"))
        await commits.wait_until(
            lambda _: all(commits_of(commits).get(s, 0) >= 3 for s in sessions[1:]), timeout=60
        )
        assert a.proc.returncode is None, "the paused node should keep running"
        log = by_session(await record_log(nc))
        for session in sessions:
            assert_one_writer_at_a_time(log[session], session)
        for session in sessions[1:]:
            assert_answered_once(log[session], session)
            assert {node for node, _ in log[session]} == {
                log[session][0][0], log[session][-1][0]
            } and log[session][0][0] != log[session][-1][0], "the session did not move"
    finally:
        if stopped:
            a.proc.send_signal(signal.SIGCONT)
        await a.terminate()
        await b.terminate()


# -- failover: a killed node -----------------------------------------------------------------
@pytest.mark.timeout(240)
async def test_a_killed_nodes_sessions_move_to_the_survivor_restored_from_the_bank(
    nats_server: EmbeddedNats, nc: Client, tiny_model: Path, tmp_path: Path
):
    """Given 12 sessions served by node A, each with a turn banked in the object store, when
    A is SIGKILLed while their second prompts arrive, node B takes A's partitions within the
    lease TTL, every accepted prompt is answered by exactly one commit with contiguous
    generations, A's records all come before B's, and every turn B runs restores the
    session's KV from the bank instead of recomputing it."""
    url, js = nats_server.url, nc.jetstream()
    # A slot per session: each first turn is banked as it commits, none at an eviction.
    flags = ("--lease-ttl-s", TTL, "--bank-object-store", "--slots", "12", "--no-balance")
    a = await NodeProcess.up(url, tmp_path / "a", tiny_model, *flags)
    b = await NodeProcess.up(url, tmp_path / "b", tiny_model, *flags)
    sessions = [f"move-{i}" for i in range(12)]
    commits = await EventCollector.start(nc, S.events("*", "commit"))
    accepted = await EventCollector.start(nc, S.events("*", "accepted"))
    done = await EventCollector.start(nc, S.events("*", "done"))
    banked = await EventCollector.start(nc, f"$O.{S.bank_bucket}.M.>")
    try:
        for i, session in enumerate(sessions):
            await js.publish(S.prompt(session), prompt(f"session {i}: remember this, {i}"))
        await commits.wait_until(lambda _: len(commits_of(commits)) == 12, timeout=60)
        # Two objects per snapshot: its bytes, then the metadata that makes it visible.
        await banked.wait_until(lambda ms: len(ms) >= 24, timeout=60)
        for i, session in enumerate(sessions):
            await js.publish(S.prompt(session), prompt(f"and the second question, {i}", 16))
        await accepted.wait_until(lambda ms: len(ms) >= 13, timeout=60)
        await a.kill()
        await b.wait_for_line(GAINED, timeout=30)
        await commits.wait_until(
            lambda _: all(commits_of(commits).get(s, 0) >= 2 for s in sessions), timeout=90
        )
        log = by_session(await record_log(nc))
        moved_turns = set()
        for session in sessions:
            assert_answered_once(log[session], session)
            assert_one_writer_at_a_time(log[session], session)
            first_writer = log[session][0][0]
            moved_turns |= {r.turn_id for node, r in log[session]
                            if isinstance(r, CommitRecord) and node != first_writer}
        assert moved_turns, "every turn finished before the kill; nothing moved"
        sources = {d["turn_id"]: d["cache"]["source"] for d in map(json.loads,
                   (m.data for m in done.messages))}
        assert {sources[t] for t in moved_turns} == {"bank"}, sources
    finally:
        await b.terminate()
        if a.proc.returncode is None:
            await a.terminate()


async def poll_metrics(nc: Client, stop: asyncio.Event, waits: list[float]) -> None:
    """Ask the nodes for their metrics every 50 ms until ``stop``; note each reply's wait."""
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            await nc.request(S.admin("metrics"), b"{}", timeout=5)
        except TimeoutError:  # no node answered: the survivor froze (or none is up)
            waits.append(5.0)
        else:
            waits.append(time.perf_counter() - t0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


@pytest.mark.timeout(180)
async def test_a_survivor_keeps_answering_metrics_and_turns_while_it_indexes_moved_snapshots(
    nats_server: EmbeddedNats, nc: Client, tiny_model: Path, tmp_path: Path
):
    """Given node A serving 16 sessions banked in the object store and standby B, when A is
    SIGKILLed while metrics are asked for every 50 ms, then B answers every metrics request
    within seconds while it takes the sessions over and indexes their snapshots, and answers
    each session's next prompt (a turn restoring state B never held)."""
    url, js = nats_server.url, nc.jetstream()
    flags = ("--lease-ttl-s", TTL, "--bank-object-store", "--slots", "16", "--no-balance")
    a = await NodeProcess.up(url, tmp_path / "a", tiny_model, *flags)
    b = await NodeProcess.up(url, tmp_path / "b", tiny_model, *flags)
    sessions = [f"poll-{i}" for i in range(16)]
    commits = await EventCollector.start(nc, S.events("*", "commit"))
    banked = await EventCollector.start(nc, f"$O.{S.bank_bucket}.M.>")
    stop, waits = asyncio.Event(), []
    poller = asyncio.get_running_loop().create_task(poll_metrics(nc, stop, waits))
    try:
        for i, session in enumerate(sessions):
            await js.publish(S.prompt(session), prompt(f"session {i}: remember this, {i}"))
        await commits.wait_until(lambda _: len(commits_of(commits)) == 16, timeout=60)
        await banked.wait_until(lambda ms: len(ms) >= 32, timeout=60)  # bytes, then meta
        await a.kill()
        for i, session in enumerate(sessions):
            await js.publish(S.prompt(session), prompt(f"and after the kill, {i}"))
        await b.wait_for_line(GAINED, timeout=30)
        await commits.wait_until(
            lambda _: all(commits_of(commits).get(s, 0) >= 2 for s in sessions), timeout=60
        )
    finally:
        stop.set()
        await poller
        await b.terminate()
        if a.proc.returncode is None:
            await a.terminate()
    assert waits and max(waits) < 5.0, f"a metrics request waited {max(waits):.1f} s"


# -- hand-over: a node stopped with SIGTERM --------------------------------------------------
@pytest.mark.timeout(240)
async def test_a_node_stopped_with_sigterm_hands_its_sessions_over_before_its_leases_expire(
    nats_server: EmbeddedNats, nc: Client, tiny_model: Path, tmp_path: Path
):
    """Given node A serving four sessions with a 30 s lease and the bank in the object store,
    when A is stopped with SIGTERM, node B takes its partitions well before the leases could
    have expired (A gave them back), and B answers the next prompts once each, restoring
    every session from the bank."""
    url, js = nats_server.url, nc.jetstream()
    # A slot per session: each first turn is banked as it commits, none at an eviction.
    flags = ("--lease-ttl-s", "30", "--bank-object-store", "--slots", "4", "--no-balance")
    a = await NodeProcess.up(url, tmp_path / "a", tiny_model, *flags)
    b = await NodeProcess.up(url, tmp_path / "b", tiny_model, *flags)
    sessions = [f"hand-{i}" for i in range(4)]
    commits = await EventCollector.start(nc, S.events("*", "commit"))
    done = await EventCollector.start(nc, S.events("*", "done"))
    try:
        for i, session in enumerate(sessions):
            await js.publish(S.prompt(session), prompt(f"session {i}: keep this, {i}"))
        await commits.wait_until(lambda _: len(commits_of(commits)) == 4, timeout=60)
        await a.terminate()
        assert a.proc.returncode == 0
        await b.wait_for_line(GAINED, timeout=15)  # the leases would last 20 s or more
        for session in sessions:
            await js.publish(S.prompt(session), prompt("and after the move?"))
        await commits.wait_until(
            lambda _: all(commits_of(commits).get(s, 0) >= 2 for s in sessions), timeout=60
        )
        log = by_session(await record_log(nc))
        sources = {d["turn_id"]: d["cache"]["source"] for d in map(json.loads,
                   (m.data for m in done.messages))}
        for session in sessions:
            assert_answered_once(log[session], session)
            assert_one_writer_at_a_time(log[session], session)
            last = [r for _, r in log[session] if isinstance(r, CommitRecord)][-1]
            assert log[session][-1][0] != log[session][0][0], f"{session} did not move"
            assert sources[last.turn_id] == "bank", session
    finally:
        await b.terminate()


@pytest.mark.timeout(60)
async def test_a_node_whose_server_went_away_stops_without_waiting_on_each_lease(
    make_node, tmp_path
):
    """With no server to give the leases back to, stop leaves them to their TTL at once
    instead of timing out on each of the 16 partitions in turn (80 s before)."""
    server = EmbeddedNats(tmp_path / "gone")
    await server.start()
    node = await make_node(url=server.url, bank_ram_bytes=0)
    owner = next(a for a in node.actors if isinstance(a, PartitionLeases))
    assert len(owner.leases) == 16
    await server.stop()
    await asyncio.wait_for(node.stop(), 20)
    assert owner.leases == {}


async def test_a_node_whose_server_went_away_mid_renewal_stops_without_waiting_it_out(
    make_node, tmp_path
):
    """The server goes away while the node renews its leases: the stop cancels the round,
    whose requests would each wait out their timeout (one lease after another, 90 s
    before), and leaves the leases to their TTL."""
    server = EmbeddedNats(tmp_path / "gone")
    await server.start()
    node = await make_node(url=server.url, bank_ram_bytes=0, lease_ttl_s=1.5)
    owner = next(a for a in node.actors if isinstance(a, PartitionLeases))
    assert len(owner.leases) == 16
    await server.stop()
    sent = owner.nc.stats["out_msgs"]
    await until(lambda: owner.nc.stats["out_msgs"] > sent, timeout=10,
                what="a renewal request sent while the server is gone")
    await asyncio.wait_for(node.stop(), 15)
    assert owner.leases == {}


@pytest.mark.timeout(180)
async def test_a_turn_cut_by_a_killed_node_ends_with_provisional_and_aborted_from_the_next_owner(
    nats_server: EmbeddedNats, nc: Client, tiny_model: Path, tmp_path: Path
):
    """Given node A streaming a long turn, when A is SIGKILLed, then node B, taking the
    session over, publishes the cut turn's provisional and aborted events (marked
    Infer-Aborted), so a client that saw it start sees it end."""
    url, js = nats_server.url, nc.jetstream()
    flags = ("--lease-ttl-s", TTL, "--ctx", "4096", "--no-balance")
    a = await NodeProcess.up(url, tmp_path / "a", tiny_model, *flags)
    b = await NodeProcess.up(url, tmp_path / "b", tiny_model, *flags)
    events = await EventCollector.start(nc, S.events_all("cut"))

    def of(kind: str) -> list:
        return [m for m in events.messages if m.subject == S.events("cut", kind)]

    try:
        await js.publish(S.prompt("cut"), prompt("talk for a long time", max_tokens=8000))
        await events.wait_until(lambda _: of("token"), timeout=60)
        cut = json.loads(of("started")[0].data)["turn_id"]
        await a.kill()
        assert not of("done"), "the long turn ended before the kill; it needs more tokens"
        await b.wait_for_line(GAINED, timeout=30)
        await events.wait_until(lambda _: any(
            json.loads(m.data)["turn_id"] == cut for m in of("aborted")), timeout=30)
    finally:
        await b.terminate()
        if a.proc.returncode is None:  # the test failed before the kill
            await a.terminate()
    # B's own stop aborts the retried turn too: only the cut turn's events count here.
    (provisional,), (aborted,) = (
        [m for m in of(kind) if json.loads(m.data)["turn_id"] == cut]
        for kind in ("provisional", "aborted")
    )
    for msg in (provisional, aborted):
        assert (msg.headers or {}).get(ABORTED_HEADER) == "1"
    assert json.loads(aborted.data)["reason"] == "node_restart"
