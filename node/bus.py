"""Connections to NATS: the node's options, logged callbacks, and a clear first failure.

Once connected, a client reconnects forever (the node must survive a NATS restart), but the
first connect has a deadline: nats-py would otherwise retry an unreachable server silently
for ever, and a node that never starts must say why.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from nats.aio.client import Client

from node.config import NodeConfig

log = structlog.get_logger("bus")

DEFAULT_CONNECT_TIMEOUT_S = 5.0


class BusError(ConnectionError):
    """The first connection to NATS failed; the message says what to do."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"cannot reach NATS at {url}: {reason}; start one with `infernode up` "
            "or pass --nats-url"
        )


class _ConnectionEvents:
    """nats-py callbacks that log, and remember the last error for the first connect."""

    def __init__(self, name: str) -> None:
        self.log = log.bind(connection=name)
        self.nc: Client | None = None
        self.connected = False
        self.last_error: BaseException | None = None

    async def on_error(self, error: Exception) -> None:
        self.last_error = error
        # Before the first connect, failures are retried and reported once by connect().
        emit = self.log.warning if self.connected else self.log.debug
        emit("nats_error", error=str(error) or type(error).__name__)

    async def on_disconnected(self) -> None:
        closing = self.nc is not None and (self.nc.is_closed or self.nc.is_draining)
        if self.connected and not closing:
            self.log.warning("nats_disconnected")

    async def on_reconnected(self) -> None:
        self.log.info("nats_reconnected")


async def connect(
    config: NodeConfig,
    url: str | None = None,
    name: str = "infernode",
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> Client:
    """A connected client named ``name`` to ``url`` (or ``config.nats_url``), or BusError."""
    options = config.nats_connect_options(url, name)
    shown = ",".join(options["servers"])
    events = _ConnectionEvents(name)
    nc = Client()
    events.nc = nc
    try:
        await asyncio.wait_for(
            nc.connect(
                **options,
                error_cb=events.on_error,
                disconnected_cb=events.on_disconnected,
                reconnected_cb=events.on_reconnected,
            ),
            timeout,
        )
    except TimeoutError:
        await _abandon(nc)
        reason = _describe(events.last_error) or f"no answer within {timeout:g} s"
        raise BusError(shown, reason) from events.last_error
    except Exception as e:
        await _abandon(nc)
        raise BusError(shown, _describe(e) or type(e).__name__) from e
    events.connected = True
    log.debug(
        "nats_connected",
        connection=name,
        url=nc.connected_url.netloc if nc.connected_url else shown,
    )
    return nc


def _describe(error: BaseException | None) -> str:
    if error is None:
        return ""
    return str(error).strip() or type(error).__name__


async def _abandon(nc: Client) -> None:
    # A cancelled first connect may leave reader or flusher tasks behind; close them.
    with contextlib.suppress(Exception):
        await nc.close()
