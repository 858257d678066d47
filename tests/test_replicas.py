"""--replicas: every JetStream asset the node makes is kept on that many servers.

- On a 3-server cluster, a node with --replicas 3 makes its intake and record streams, its
  lease bucket and the bank's object store with three copies each; a gateway its buckets.
- Assets made with one copy are updated to three when a node asks for three.
- More copies than the servers can place (one server; 5 on 3 servers) stop the node with a
  sentence saying why and naming --replicas; nothing is half-made.
"""

from __future__ import annotations

import nats
import pytest
from nats.aio.client import Client
from structlog.testing import capture_logs

from actors.gateway import Gateway, GatewaySettings
from actors.replicas import ReplicasError
from node.app import StartError
from node.config import ConfigError, NodeConfig
from node.streams import ensure_streams
from schemas.subjects import Subjects
from tests.nats_cluster import NatsCluster

S = Subjects()


async def replica_counts(nc: Client) -> dict[str, int]:
    """Each stream's name → its replica count, as JetStream reports it."""
    js = nc.jetstream()
    return {info.config.name or "": info.config.num_replicas or 1
            for info in await js.streams_info()}


def test_replicas_come_from_the_flag_or_the_environment_within_jetstreams_limit():
    """INFERNODE_REPLICAS sets it, 1 is the default, and 0 or 6 are refused naming --replicas."""
    assert NodeConfig().replicas == 1
    assert NodeConfig.from_env({"INFERNODE_REPLICAS": "3"}).replicas == 3
    for bad in (0, 6):
        with pytest.raises(ConfigError, match="--replicas"):
            NodeConfig(replicas=bad)


@pytest.mark.timeout(120)
async def test_a_node_with_three_replicas_keeps_every_asset_on_the_three_servers(
    nats_cluster: NatsCluster, make_node
):
    """Given a 3-server cluster, a node started with --replicas 3 and the bank in the object
    store has three copies of the intake and record streams, the lease bucket and the bank."""
    node = await make_node(url=nats_cluster.url, replicas=3, bank_object_store=True)
    nc = await nats.connect(nats_cluster.urls)
    try:
        counts = await replica_counts(nc)
        s = node.subjects
        wanted = {s.prompt_stream, s.record_stream, s.kv_stream(s.lease_bucket),
                  s.bank_object_stream}
        assert {name: counts.get(name) for name in wanted} == dict.fromkeys(wanted, 3)
        info = await nc.jetstream().stream_info(s.record_stream)
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
    finally:
        await nc.drain()


@pytest.mark.timeout(120)
async def test_assets_made_with_one_replica_are_updated_to_three(
    nats_cluster: NatsCluster, make_node
):
    """Given streams, leases and bank made by a node with one replica, a node started with
    --replicas 3 on the same cluster updates each to three copies, warning of each one."""
    first = await make_node(url=nats_cluster.url, bank_object_store=True)
    await first.stop()
    nc = await nats.connect(nats_cluster.urls)
    try:
        before = await replica_counts(nc)
        s = first.subjects
        assert {s.prompt_stream, s.record_stream, s.kv_stream(s.lease_bucket),
                s.bank_object_stream} <= set(before)
        assert set(before.values()) == {1}
        with capture_logs() as logs:
            await make_node(url=nats_cluster.url, replicas=3, bank_object_store=True)
        changed = {e["stream"]: (e["was"], e["now"]) for e in logs
                   if e["event"] == "replicas_changed"}
        assert changed == dict.fromkeys(before, (1, 3))
        js = nc.jetstream()
        after = {name: (await js.stream_info(name)).config.num_replicas for name in before}
        assert after == dict.fromkeys(before, 3)
    finally:
        await nc.drain()


async def test_three_replicas_on_one_server_are_refused_with_the_fix(nc: Client, make_node):
    """Given one nats-server, streams with three replicas are refused with a sentence saying
    the server is not a cluster and naming --replicas 1, and a node asked for three does not
    start; no stream is left behind."""
    with pytest.raises(ReplicasError, match=r"not a JetStream cluster; pass --replicas 1"):
        await ensure_streams(nc.jetstream(), S, 1 << 20, replicas=3)
    with pytest.raises(StartError, match=r"cannot keep 3 replicas of the stream"):
        await make_node(replicas=3)
    assert await replica_counts(nc) == {}


@pytest.mark.timeout(120)
async def test_more_replicas_than_cluster_servers_are_refused_naming_the_asset(
    nats_cluster: NatsCluster, make_node
):
    """Given a 3-server cluster, a node asked for five replicas is refused with a sentence
    naming the stream, JetStream's answer and the fix."""
    with pytest.raises(StartError) as refused:
        await make_node(url=nats_cluster.url, replicas=5)
    message = str(refused.value)
    assert f"cannot keep 5 replicas of the stream {S.prompt_stream}" in message
    assert "no suitable peers for placement" in message
    assert "start the missing servers, or pass --replicas" in message


@pytest.mark.timeout(60)
async def test_the_gateways_buckets_have_the_configured_replicas(nats_cluster: NatsCluster):
    """Given a 3-server cluster, an OpenAI gateway with three replicas makes its conversation
    and answer buckets with three copies each."""
    nc = await nats.connect(nats_cluster.urls)
    try:
        settings = GatewaySettings(port=0, model_name="m", replicas=3)
        async with Gateway(nc, S, settings):
            counts = await replica_counts(nc)
        buckets = (S.gateway_bucket, S.gateway_answers_bucket)
        assert {b: counts.get(S.kv_stream(b)) for b in buckets} == dict.fromkeys(buckets, 3)
    finally:
        await nc.drain()
