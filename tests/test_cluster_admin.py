"""Admin across nodes: health, sessions and metrics show every node on one NATS.

- Two node processes on one nats-server: `$SRV.PING.infernode` gets one reply per node,
  with distinct ids; `infernode health` lists both nodes, which partitions each holds (8
  each, together all 16, as in the lease bucket) and their load; `infernode sessions`
  lists the sessions of both, each under the node that owns its partition; each session's
  history is answered (by its owner); `infernode metrics` prints each node's families
  under its own heading.
- A node that is live by its membership key but does not answer is named, and the command
  exits 1 with what the others said.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from nats.aio.client import Client

from actors.leases import PartitionLeases
from node.client import InfernodeClient
from node.nats_server import EmbeddedNats
from schemas.subjects import Subjects, partition_of
from tests.helpers import EventCollector, lease_owners_until, publish_prompt, until
from tests.support.cluster import commits_of
from tests.support.node_process import NodeProcess

S = Subjects()


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``infernode <args>`` against ``url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args, "--nats-url", url],
        env=env, capture_output=True, text=True, timeout=60,
    )


async def ping_all(nc: Client, subject: str, want: int, timeout: float) -> list[dict]:
    """Every reply to one request on ``subject`` until ``want`` came (or the deadline)."""
    inbox = nc.new_inbox()
    replies = await EventCollector.start(nc, inbox)
    await nc.publish(subject, b"", reply=inbox)
    try:
        await replies.wait_until(lambda ms: len(ms) >= want, timeout=timeout)
    finally:
        await replies.stop()
    return replies.decoded


@pytest.mark.timeout(240)
async def test_every_node_answers_ping_health_sessions_and_metrics(
    nats_server: EmbeddedNats, nc: Client, tiny_model: Path, tmp_path: Path
):
    """Given two node processes balanced 8/8 and sessions on both, a `$SRV.PING` request
    gets two replies with distinct ids, and health, sessions and metrics show both nodes:
    their partitions, load, sessions and families."""
    url = nats_server.url
    flags = ("--lease-ttl-s", "2")
    a, b = await asyncio.gather(
        NodeProcess.up(url, tmp_path / "a", tiny_model, *flags),
        NodeProcess.up(url, tmp_path / "b", tiny_model, *flags),
    )
    try:
        owners = await lease_owners_until(
            nc, lambda o: sorted(Counter(o.values()).values()) == [8, 8], timeout=60
        )
        nodes = sorted(set(owners.values()))
        names = [f"adm-{i}" for i in range(200)]
        sessions = [  # four sessions on each node
            s for n in nodes for s in [x for x in names if owners[partition_of(x, 16)] == n][:4]
        ]
        commits = await EventCollector.start(nc, S.events("*", "commit"))
        for session in sessions:
            await publish_prompt(nc, session, "hello")
        await commits.wait_until(lambda _: len(commits_of(commits)) == len(sessions), 60)

        pings = await ping_all(nc, f"$SRV.PING.{S.service_name}", 2, timeout=10)
        assert len(pings) == 2 and len({p["id"] for p in pings}) == 2
        assert sorted(p["metadata"]["node"] for p in pings) == nodes

        health = await asyncio.to_thread(cli, url, "health", "--json")
        assert health.returncode == 0, health.stderr
        view = json.loads(health.stdout)
        assert view["live"] == nodes and view["missing"] == []
        assert [n["node"] for n in view["nodes"]] == nodes
        for n in view["nodes"]:
            mine = sorted(p for p, owner in owners.items() if owner == n["node"])
            assert n["partitions"] == mine == view["owners"][n["node"]]
            assert {"turns_in_flight", "slots_busy", "pending"} <= set(n)
        text = await asyncio.to_thread(cli, url, "health")
        assert text.returncode == 0 and all(node in text.stdout for node in nodes)

        listed = await asyncio.to_thread(cli, url, "sessions", "--json")
        assert listed.returncode == 0, listed.stderr
        served = {s["session"]: s["node"] for s in json.loads(listed.stdout)["sessions"]}
        assert served == {s: owners[partition_of(s, 16)] for s in sessions}

        async with InfernodeClient(url) as client:  # answered by each session's owner
            histories = [await client.history(s, timeout=10) for s in sessions]
        assert [h.generation for h in histories] == [1] * len(sessions)

        metrics = await asyncio.to_thread(cli, url, "metrics")
        assert metrics.returncode == 0, metrics.stderr
        headings = [line for line in metrics.stdout.splitlines() if line.startswith("# node")]
        assert headings == [f"# node {n}" for n in nodes]
    finally:
        await asyncio.gather(a.terminate(), b.terminate())


async def test_a_live_node_that_does_not_answer_is_named_and_the_command_fails(
    make_node, nc: Client
):
    """Given a node and a second live member that serves nothing, `health` prints the node
    that answered, names the silent one and exits 1; `health --local` with the node's data
    directory (a container's healthcheck) checks only that node and exits 0."""
    # No balance: nothing is handed to the silent member, which takes nothing either.
    node = await make_node(lease_ttl_s=3, balance=False)
    silent = PartitionLeases(nc, S, "silent-node", 16, 30.0, 1, balance=False)
    await silent.start()
    leases = next(a for a in node.actors if isinstance(a, PartitionLeases))
    try:
        await until(lambda: "silent-node" in leases.members, timeout=10, what="the node "
                    "reading the silent member's key")
        run = await asyncio.to_thread(cli, node.url, "health", "--timeout", "2")
        assert run.returncode == 1
        assert f"node             {node.node_id}" in run.stdout
        assert "silent-node" in run.stderr and "no answer" in run.stderr
        local = await asyncio.to_thread(
            cli, node.url, "health", "--local", "--data-dir", str(node.config.data_dir)
        )
        assert local.returncode == 0, local.stderr
        assert f"node             {node.node_id}" in local.stdout
    finally:
        await silent.stop()
