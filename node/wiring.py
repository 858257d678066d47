"""The node's actors, built from its configuration in one place.

``node.app.Node`` and the tests' node both build their actors here, so both run with the
same limits; only the engine actor differs (the real one, or a scripted one in tests). Each
actor is handed its part of the ``NodeConfig`` and has no defaults of its own.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Awaitable, Callable

from nats.aio.client import Client

from actors.admission import Admission
from actors.bank_committer import BankCommitter
from actors.base import Actor
from actors.engine.actor import EngineActor
from actors.engine.engine import SlotEngine
from actors.gateway import GatewaySettings, HttpLimits, read_api_keys
from actors.leases import PartitionLeases
from actors.session.host import HostSettings, RunnerHost
from node.admin import AdminActor, NodeView
from node.config import NodeConfig
from node.service import NodeService
from node.streams import answer_seal_secret, ensure_streams
from schemas.subjects import Subjects

Connect = Callable[[str], Awaitable[Client]]
"""Opens the named connection of one actor."""


def node_identity(config: NodeConfig) -> str:
    """The node's id: ``--node-id``, else this host's name and a hash of the data directory.

    The same on every restart of the same node (a container keeps its host name), so a
    restarted node recognises its own partition leases and takes them back at once instead
    of waiting out their TTL; different for nodes that share a data volume but not a host
    (``docker compose up --scale node=3``) and for nodes on one host with their own data.
    """
    if config.node_id:
        return config.node_id
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:48] or "node"
    where = hashlib.sha256(str(config.data_dir.resolve()).encode()).hexdigest()[:8]
    return f"{host}-{where}"


def host_settings(config: NodeConfig) -> HostSettings:
    """The session runners' part of the configuration."""
    return HostSettings(
        max_pending=config.max_pending_per_session, max_sessions=config.max_sessions,
        max_pending_bytes=config.max_pending_bytes, max_session_bytes=config.max_session_bytes,
        max_node_bytes=config.max_node_bytes,
        tombstones=config.tombstones, turn_timeout_s=config.turn_timeout_s,
        turn_probe_s=config.turn_probe_s, heartbeat_s=config.heartbeat_s,
        stop_wait_s=config.stop_wait_s,
    )


def gateway_settings(
    config: NodeConfig, port: int, host: str, model_name: str | None = None
) -> GatewaySettings:
    """The OpenAI gateway's part of the configuration (keys read from their file)."""
    return GatewaySettings(
        port=port, host=host,
        api_keys=read_api_keys(config.api_keys) if config.api_keys else {},
        limits=HttpLimits(
            max_body_bytes=config.openai_max_body_bytes,
            max_requests=config.openai_max_requests,
        ),
        header_timeout_s=config.openai_header_timeout_s,
        max_connections=config.openai_max_connections,
        max_connections_per_client=config.openai_max_connections_per_client,
        model_name=model_name,
        replicas=config.replicas,
    )


async def prepare_streams(nc: Client, subjects: Subjects, config: NodeConfig) -> None:
    """The intake and record streams, with the configured bounds, retention and replicas."""
    await ensure_streams(
        nc.jetstream(), subjects, config.max_payload,
        config.intake_max_prompts, config.intake_max_bytes,
        config.records_max_age, config.records_max_bytes, config.partitions, config.replicas,
    )


async def engine_actor(
    config: NodeConfig, subjects: Subjects, connect: Connect, engine: SlotEngine
) -> EngineActor:
    """The actor serving a loaded engine, with its durable bank tier as configured."""
    return EngineActor(
        await connect("engine"), subjects, engine, config.bank_dir, config.bank_object_store,
        config.bank_durable_bytes, config.replicas,
    )


async def build_actors(
    config: NodeConfig, subjects: Subjects, connect: Connect, engine: Actor,
    admin_nc: Client, node: NodeView, version: str, metadata: dict[str, str], node_id: str,
) -> list[Actor]:
    """Every actor in start order: partition leases, engine, bank committer, session
    runners, admission, admin, and last the micro service, whose endpoints (ask, admin)
    open once all behind them runs.

    Start order follows the data; stopping runs it in reverse, so nothing is pulled that
    cannot be recorded, no turn is cut without its abort being recorded, and the leases
    are given back last: once this node's sessions are at rest and their snapshots are in
    the durable bank, so the node taking them over restores instead of recomputing.
    """
    admin = AdminActor(admin_nc, subjects, node)
    # The ask door seals where an ask's answer goes; admission honours only what it sealed.
    seal_secret = await answer_seal_secret(admin_nc.jetstream(), subjects, config.replicas)
    leases = PartitionLeases(
        await connect("leases"), subjects, node_id, config.partitions, config.lease_ttl_s,
        config.replicas,
        config.balance,
    )
    return [
        leases,
        engine,
        BankCommitter(await connect("bank"), subjects, config.commit_wait_s),
        RunnerHost(await connect("runners"), subjects, host_settings(config), leases),
        Admission(await connect("admission"), subjects, config.max_payload, leases, seal_secret),
        admin,
        NodeService(admin_nc, subjects, admin, version, metadata, seal_secret),
    ]
