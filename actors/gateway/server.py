"""The gateway as a running thing: uvicorn serving the app, next to one NATS connection.

uvicorn parses HTTP; two guards are added at the connection level, where the app cannot
see: a connection that has not finished sending its request headers within
``header_timeout_s`` is closed (uvicorn would wait for ever: the slow-loris attack), and
open connections are capped per client address and in all (``connections``: idle ones
make room for new ones, so sockets held open starve nobody).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import PurePath

import structlog
import uvicorn
from nats.aio.client import Client
from uvicorn.protocols.http.h11_impl import H11Protocol

from actors.gateway.calls import ChatService
from actors.gateway.chain import ConversationIndex
from actors.gateway.connections import ConnectionTable, refuse
from actors.gateway.http import GatewayApp, HttpLimits
from actors.gateway.sessions import SessionRouter
from schemas.admin import HealthReply
from schemas.subjects import AdminVerb, Subjects

log = structlog.get_logger("gateway")

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class GatewayBindError(ValueError):
    """The gateway may not listen where it was asked to; the message says why."""


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway needs, handed in by the node's configuration."""

    port: int = 8000
    """TCP port (0 picks a free one)."""
    host: str = "127.0.0.1"
    """Address to listen on; beyond loopback only with API keys."""
    api_keys: dict[str, str] = field(default_factory=dict)
    """Bearer key → agent; empty means no auth (loopback only)."""
    limits: HttpLimits = HttpLimits()
    """Body size and concurrency limits."""
    max_connections: int = 2048
    """Open connections in all (idle ones are closed to make room for new ones)."""
    max_connections_per_client: int = 256
    """Open connections from one client address (its idle ones make room first)."""
    header_timeout_s: float = 10.0
    """Time a connection has to send its request headers."""
    turn_timeout_s: float = 600.0
    """Longest a call waits for its turn's answer."""
    model_name: str | None = None
    """Name under ``/v1/models``; None asks the node's health."""
    replicas: int = 1
    """Copies of the gateway's KV buckets on the servers of a NATS cluster."""

    def __post_init__(self) -> None:
        if not self.api_keys and self.host not in LOOPBACK:
            raise GatewayBindError(
                f"the OpenAI gateway would listen on {self.host} without API keys; give it "
                "--api-keys FILE (or INFERNODE_API_KEYS) or listen on 127.0.0.1"
            )


def guarded_protocol(header_timeout_s: float, table: ConnectionTable) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline and the connection caps of ``table``."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _refused = False
        _idle_from = 0.0
        address = ""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.address = self.client[0] if self.client else ""
            self._idle_from = time.monotonic()
            refused = table.admit(self)
            if refused is not None:
                self._refused = True
                refuse(transport, table, *refused)
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if not self._refused:  # a refused client's request is read and dropped
                super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle_from = time.monotonic()
            self._arm()  # the next request on a kept-alive connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            table.remove(self)
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def idle_since(self) -> float | None:
            if self.cycle is not None and not self.cycle.response_complete:
                return None  # a request is running
            return self._idle_from

        def evict(self) -> None:
            log.info("gateway_connection_evicted", client=self.address)
            self.transport.close()

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _headers_late(self) -> None:
            # A request whose headers arrived has a cycle still running; anything else is a
            # connection sending nothing or dribbling its headers.
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

    return GuardedH11Protocol


class Gateway:
    """The OpenAI-compatible HTTP door: a client of the node over NATS."""

    name = "gateway"

    def __init__(self, nc: Client, subjects: Subjects, settings: GatewaySettings) -> None:
        self.nc = nc
        self.subjects = subjects
        self.settings = settings
        self.port: int | None = None
        self.app: GatewayApp | None = None
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self.connections = ConnectionTable(settings.max_connections,
                                           settings.max_connections_per_client)
        """Open connections by client address (the caps' bookkeeping)."""

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the index, bind the port and serve."""
        s = self.settings
        index = await ConversationIndex.open(self.nc.jetstream(), self.subjects, s.replicas)
        service = ChatService(self.nc, self.subjects, SessionRouter(index), s.turn_timeout_s)
        service.model = s.model_name or await self._model_name()
        self.app = GatewayApp(service, s.api_keys, s.limits)
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        self._socket = socket.create_server((s.host, s.port), family=family, backlog=1024)
        config = uvicorn.Config(
            self.app.asgi, http=guarded_protocol(s.header_timeout_s, self.connections),
            ws="none", lifespan="off", log_config=None, access_log=False,
            timeout_keep_alive=5, timeout_graceful_shutdown=5,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._socket])
        self._server = server
        self.port = self._socket.getsockname()[1]
        log.info("gateway_ready", host=s.host, port=self.port, model=service.model,
                 auth=bool(s.api_keys))

    async def stop(self) -> None:
        """Stop accepting, let running calls finish (bounded), close the port."""
        if self._server is not None:
            self._server.should_exit = True
            await self._server.shutdown(sockets=[self._socket] if self._socket else None)
            self._server = None
            self._socket = None

    async def _model_name(self) -> str:
        """The node's model file name (from its micro service metadata), else its health."""
        try:
            msg = await self.nc.request(self.subjects.service_info(), b"{}", timeout=2)
            path = json.loads(msg.data).get("metadata", {}).get("model")
            if path:
                return PurePath(path).stem
            msg = await self.nc.request(self.subjects.admin(AdminVerb.HEALTH), b"{}", timeout=2)
            return HealthReply.model_validate_json(msg.data).model
        except Exception as e:  # no node yet: the gateway still serves once one comes
            log.info("gateway_model_unknown", error=repr(e))
            return "infernode"
