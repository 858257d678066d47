"""Nodes balance: a node that joins takes a fair share of the partitions.

- The rule: shares add up to the partitions, the first nodes by id take the remainder, and
  a node over its share gives up its coldest partitions.
- Leases alone: node A takes all 16; B joins and takes none free; once the membership held
  still for a TTL, A gives up 8 and B takes them; then nothing moves again. A node that
  comes and goes within a TTL moves nothing; one that stops gives its share back at once.
- Two node processes: A alone serves sessions; B joins; within a deadline each holds 8;
  prompts sent during the move are answered once with contiguous generations, and every
  moved session's first turn on B restores its KV from the bank.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from nats.aio.client import Client

from actors.balance import fair_shares, surplus
from actors.leases import PartitionLeases
from node.nats_server import EmbeddedNats
from schemas.records import CommitRecord
from schemas.subjects import Subjects, partition_of
from tests.helpers import EventCollector, lease_owners_until, until
from tests.support.cluster import (
    assert_answered_once,
    assert_one_writer_at_a_time,
    by_session,
    commits_of,
    prompt,
    record_log,
)
from tests.support.node_process import NodeProcess

S = Subjects()
HANDING = re.compile(r'"event": "leases_handing_over"')
HANDED = re.compile(r'"event": "sessions_handed_over"')


def test_fair_shares_add_up_to_the_partitions_and_the_first_nodes_take_the_rest():
    """16 partitions over 3 nodes are 6, 5, 5 by node id whatever order the ids come in;
    over 1 node all 16; the shares always add up to the partitions."""
    assert fair_shares(["c", "a", "b"], 16) == {"a": 6, "b": 5, "c": 5}
    assert fair_shares(["b", "c", "a", "a"], 16) == {"a": 6, "b": 5, "c": 5}
    assert fair_shares(["solo"], 16) == {"solo": 16}
    for m in range(1, 20):
        assert sum(fair_shares([f"n{i}" for i in range(m)], 16).values()) == 16


def test_a_node_over_its_share_gives_up_its_coldest_partitions():
    """Holding 0-5 with a share of 3, the three coldest go (ties to the highest number);
    at or under its share nothing goes."""
    heat = {0: (1, 3, 9.0), 1: (0, 0, 0.0), 2: (0, 2, 5.0), 3: (0, 2, 1.0), 4: (0, 0, 0.0),
            5: (2, 1, 9.0)}
    assert surplus(heat, 3, heat.__getitem__) == frozenset({4, 1, 3})
    assert surplus(heat, 6, heat.__getitem__) == frozenset()
    assert surplus(heat, 9, heat.__getitem__) == frozenset()


async def test_a_joining_node_gets_half_the_leases_and_then_nothing_moves(nc: Client):
    """Given A holding all 16 leases alone, B joining takes none (none is free); after the
    membership held still for one TTL A hands 8 over and B takes them; balanced, neither
    gives up or takes anything more."""
    a = PartitionLeases(nc, S, "node-a", 16, 1.0, 1, balance=True)
    await a.start()
    assert a.held() == frozenset(range(16))
    b = PartitionLeases(nc, S, "node-b", 16, 1.0, 1, balance=True)
    await b.start()
    try:
        assert b.held() == frozenset() and b.share() == 8
        owners = await lease_owners_until(
            nc, lambda o: Counter(o.values()) == {"node-a": 8, "node-b": 8}, timeout=20
        )
        assert {p for p, n in owners.items() if n == "node-b"} == set(b.held())
        assert a.held() | b.held() == frozenset(range(16))
        assert surplus(a.held(), a.share(), lambda p: ()) == frozenset()
        before = (a.held(), b.held())
        await a._take_free()
        await b._take_free()
        assert (a.held(), b.held()) == before
    finally:
        await b.stop()
        await a.stop()


async def test_a_node_that_comes_and_goes_within_a_ttl_moves_nothing(nc: Client):
    """Given A holding all 16 leases, when B joins and stops again before the membership held
    still for a TTL, A hands nothing over: through two more TTLs of renewals no lease is
    given back and A still holds all 16."""
    a = PartitionLeases(nc, S, "node-a", 16, 1.0, 1, balance=True)
    await a.start()
    writes = await EventCollector.start(nc, f"$KV.{S.lease_bucket}.{S.lease_key(0)[:-1]}*")
    try:
        b = PartitionLeases(nc, S, "node-b", 16, 1.0, 1, balance=True)
        await b.start()
        await until(lambda: "node-b" in a.members, timeout=5, what="A seeing B")
        await b.stop()
        await until(lambda: a.members == {"node-a"}, timeout=5, what="A seeing B leave")
        seen = len(writes.messages)
        # Six more renewals of all 16: two TTLs in which a hand-over would have started.
        await writes.wait_until(lambda ms: len(ms) >= seen + 6 * 16, timeout=10)
        released = [m.subject for m in writes.messages if (m.headers or {}).get("KV-Operation")]
        assert released == [] and a.held() == frozenset(range(16))
    finally:
        await a.stop()


async def test_a_stopped_node_leaves_the_membership_and_the_other_takes_everything(nc: Client):
    """Given A and B balanced 8/8, when B stops it deletes its membership key and gives its
    leases back: A's share is 16 again and it takes B's partitions at its next renewal."""
    a = PartitionLeases(nc, S, "node-a", 16, 1.0, 1, balance=True)
    b = PartitionLeases(nc, S, "node-b", 16, 1.0, 1, balance=True)
    await a.start()
    await b.start()
    try:
        await lease_owners_until(nc, lambda o: Counter(o.values())["node-b"] == 8, timeout=20)
        await b.stop()
        await lease_owners_until(nc, lambda o: Counter(o.values()) == {"node-a": 16}, timeout=20)
        assert a.members == frozenset({"node-a"}) and a.share() == 16
    finally:
        await a.stop()


@pytest.mark.timeout(240)
async def test_a_joining_node_takes_half_the_sessions_restored_from_the_bank(
    nats_server: EmbeddedNats, nc: Client, tiny_model: Path, tmp_path: Path
):
    """Given node A alone serving 12 sessions with a turn each banked in the object store,
    when node B joins, within 30 s each holds 8 partitions; prompts sent before and during
    the move are answered by exactly one commit with contiguous generations, each session
    is written by A and then only by B, and every moved session's first turn on B restores
    its KV from the bank instead of recomputing it."""
    url, js = nats_server.url, nc.jetstream()
    # A slot per session: each first turn is banked as it commits, none at an eviction.
    flags = ("--lease-ttl-s", "2", "--bank-object-store", "--slots", "12")
    a = await NodeProcess.up(url, tmp_path / "a", tiny_model, *flags)
    sessions = [f"join-{i}" for i in range(12)]
    commits = await EventCollector.start(nc, S.events("*", "commit"))
    done = await EventCollector.start(nc, S.events("*", "done"))
    b: NodeProcess | None = None

    def answered(n: int) -> bool:
        return all(commits_of(commits).get(s, 0) >= n for s in sessions)

    try:
        await lease_owners_until(nc, lambda o: len(o) == 16 and set(o.values()) == {a_id(a)},
                                 timeout=30)
        for i, session in enumerate(sessions):
            await js.publish(S.prompt(session), prompt(f"session {i}: remember {i}"))
        await commits.wait_until(lambda _: answered(1), timeout=60)
        b = await NodeProcess.up(url, tmp_path / "b", tiny_model, *flags)
        for i, session in enumerate(sessions):  # before the move starts (it waits a TTL)
            await js.publish(S.prompt(session), prompt(f"second, {i}", 6))
        await a.wait_for_line(HANDING, timeout=30)
        for i, session in enumerate(sessions):  # while A hands over
            await js.publish(S.prompt(session), prompt(f"third, {i}", 6))
        owners = await lease_owners_until(
            nc, lambda o: sorted(Counter(o.values()).values()) == [8, 8], timeout=30
        )
        await a.wait_for_line(HANDED, timeout=30)
        await commits.wait_until(lambda _: answered(3), timeout=90)
        for i, session in enumerate(sessions):  # after the move
            await js.publish(S.prompt(session), prompt(f"fourth, {i}"))
        await commits.wait_until(lambda _: answered(4), timeout=90)
        b_id = next(n for n in owners.values() if n != a_id(a))
        log = by_session(await record_log(nc))
        sources = {d["turn_id"]: d["cache"]["source"] for d in map(json.loads,
                   (m.data for m in done.messages))}
        moved = [s for s in sessions if owners[partition_of(s, 16)] == b_id]
        assert moved, "no session's partition went to B"
        for session in sessions:
            assert_answered_once(log[session], session)
            assert_one_writer_at_a_time(log[session], session)
        for session in moved:
            assert log[session][0][0] == a_id(a) and log[session][-1][0] == b_id, session
            first_on_b = next(r for node, r in log[session]
                              if isinstance(r, CommitRecord) and node == b_id)
            assert sources[first_on_b.turn_id] == "bank", (session, sources)
    finally:
        if b is not None:
            await b.terminate()
        await a.terminate()


def a_id(node: NodeProcess) -> str:
    """The node id a node process logged when it was ready."""
    for line in node.lines:
        found = re.search(r'"event": "node_ready".*?"node": "([^"]+)"', line) or re.search(
            r'"node": "([^"]+)".*?"event": "node_ready"', line)
        if found:
            return found.group(1)
    raise AssertionError("the node logged no node_ready line with its id")
