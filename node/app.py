"""The node: embedded NATS (or a given one), the engine, the four actors and its service
(built in ``wiring``).

Start order follows the data: the partition leases first (which sessions are this node's),
the engine (loaded before any actor starts: it takes longest and everything needs it), the
bank committer, the session runners (which rebuild their sessions from the record log) and
last admission, which starts pulling prompts. Stop order is the reverse, so nothing is
pulled that cannot be recorded, no turn is cut without its abort being recorded, and the
leases go back last, once the sessions' snapshots are in the durable bank.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

import structlog
from nats.aio.client import Client

from actors.base import Actor
from actors.engine.backends.params import LlamaLibraryError, ModelLoadError
from actors.engine.engine import SlotEngine
from actors.engine.gguf_info import ModelFileError, UnsupportedModelError
from actors.engine.loader import load_engine
from actors.engine.templates.sandbox import TemplateError
from actors.gateway import ApiKeysError, Gateway, GatewayBindError
from actors.replicas import ReplicasError
from node.bus import BusError, connect
from node.config import NodeConfig
from node.local_auth import URL_FILE, LocalCredentials
from node.metrics import NodeMetrics
from node.metrics_http import MetricsHttp
from node.models import ModelChoice, ModelNameError, choose_model
from node.nats_server import EmbeddedNats, NatsServerError
from node.streams import PartitionCountError
from node.wiring import (
    build_actors,
    engine_actor,
    gateway_settings,
    node_identity,
    prepare_streams,
)
from schemas.subjects import Subjects

log = structlog.get_logger("node")

VERSION = "0.1.0"

# What can stop a start for a reason the user can fix; anything else is a bug and propagates.
_USER_ERRORS = (
    BusError, NatsServerError, ModelFileError, UnsupportedModelError, ModelLoadError,
    LlamaLibraryError, TemplateError, ModelNameError, OSError, ApiKeysError, GatewayBindError,
    PartitionCountError, ReplicasError,
)


class StartError(RuntimeError):
    """The node could not start; the message says why and what to do."""


class Node:
    """One infernode process."""

    def __init__(
        self, config: NodeConfig, on_load_progress: Callable[[float], None] | None = None
    ) -> None:
        self.config = config
        self.bus_config = config
        """What the node's own connections use (the embedded server's node user, if any)."""
        self.on_load_progress = on_load_progress
        self.node_id = ""
        """This node's id among the nodes on one NATS (known once started)."""
        self.subjects = Subjects(config.prefix)
        self.nats: EmbeddedNats | None = None
        self.url = config.nats_url or ""
        self.engine: SlotEngine | None = None
        self.model: ModelChoice | None = None
        """The model served, once started."""
        self.actors: list[Actor] = []
        self._conns: list[Client] = []
        self.metrics = NodeMetrics(self)
        self.metrics_http: MetricsHttp | None = None
        self.gateway: Gateway | None = None

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start everything; on failure, stop what was started and raise ``StartError``."""
        try:
            await self._start()
        except _USER_ERRORS as e:
            await self.stop()
            raise StartError(str(e) or type(e).__name__) from e
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.node_id = node_identity(cfg)
        # Engine and bank subjects are this node's own: a turn never reaches another node.
        self.subjects = Subjects(cfg.prefix, self.node_id)
        if cfg.nats_url is None:
            # Loopback is not enough: only users holding the generated passwords get in.
            creds = LocalCredentials.load_or_create(cfg.data_dir)
            auth = creds.write_server_config(cfg.data_dir / "nats", self.subjects)
            self.nats = EmbeddedNats(
                cfg.data_dir / "nats", port=cfg.nats_port or None, any_port_if_taken=True,
                max_payload=cfg.max_payload, config_file=auth,
            )
            await self.nats.start()
            self.url = self.nats.url
            self.bus_config = creds.node_config(cfg)
            (cfg.data_dir / URL_FILE).write_text(self.url + "\n")
            creds.write_cli_context(cfg.data_dir, self.url)
        self.model = choose_model(cfg.model, cfg.data_dir)
        model = self.model.path
        self.engine = await asyncio.to_thread(
            load_engine, replace(cfg, model=model), self.on_load_progress
        )
        admin_nc = await self._connect("admin")
        s = self.subjects
        await prepare_streams(admin_nc, s, cfg)
        engine = await engine_actor(cfg, s, self._connect, self.engine)
        metadata = {
            "prefix": cfg.prefix, "model": str(model), "engine": self.engine.info.engine,
            "node": self.node_id,
        }
        self.actors = await build_actors(
            cfg, s, self._connect, engine, admin_nc, self, VERSION, metadata, self.node_id
        )
        for actor in self.actors:
            await actor.start()
        if cfg.metrics_port is not None:
            self.metrics_http = MetricsHttp(
                self.metrics.registry, cfg.metrics_port, cfg.metrics_host
            )
            await self.metrics_http.start()
        if cfg.openai_port is not None:
            settings = gateway_settings(cfg, cfg.openai_port, cfg.openai_host, model.stem)
            self.gateway = Gateway(await self._connect("gateway"), s, settings)
            await self.gateway.start()
        # Ready means reachable: every subscription has reached the server before we say so.
        for nc in self._conns:
            await nc.flush()
        log.info("node_ready", nats=self.url, prefix=cfg.prefix, model=str(model),
                 node=self.node_id)

    async def _connect(self, name: str) -> Client:
        nc = await connect(self.bus_config, self.url, f"infernode-{name}")
        self._conns.append(nc)
        return nc

    async def stop(self) -> None:
        """Stop actors in reverse order, free the engine, close connections and NATS."""
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
        if self.metrics_http is not None:
            await self.metrics_http.stop()
            self.metrics_http = None
        for actor in reversed(self.actors):
            try:
                await actor.stop()
            except Exception as e:
                log.warning("actor_stop_failed", actor=actor.name, error=str(e))
        self.actors = []
        if self.engine is not None:
            await self.engine.close()
            self.engine = None
        for nc in self._conns:
            if not nc.is_closed:
                try:
                    await nc.drain()
                except Exception as e:
                    log.debug("drain_failed", error=str(e))
        self._conns = []
        if self.nats is not None:
            await self.nats.stop()
            self.nats = None
        log.info("node_stopped")
