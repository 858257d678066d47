"""Connections to NATS: the node's options, logged callbacks, and a clear first failure.

Once connected, a client reconnects forever (the node must survive a NATS restart), but the
first connect has a deadline: nats-py would otherwise retry an unreachable server silently
for ever, and a node that never starts must say why. A server that refuses the credentials
or the TLS handshake will refuse every retry too, so that ends the first connect at once,
with a sentence naming the settings to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from nats.aio.client import Client
from nats.errors import AuthorizationError

from node.config import NodeConfig
from node.logging import library_logger

# The client library runs inside agents' programs: it never prints, it logs (see
# library_logger), so a host whose stdout carries a protocol keeps it clean.
log = library_logger("bus")

DEFAULT_CONNECT_TIMEOUT_S = 5.0


AUTH_HINT = (
    "check the credentials: INFERNODE_NATS_USER and INFERNODE_NATS_PASSWORD, "
    "INFERNODE_NATS_TOKEN, INFERNODE_NATS_CREDS or INFERNODE_NATS_NKEY_SEED"
)
TLS_HINT = (
    "check INFERNODE_NATS_TLS_CA (the CA that signed the server's certificate) and, for "
    "mutual TLS, INFERNODE_NATS_TLS_CERT and INFERNODE_NATS_TLS_KEY"
)
REACH_HINT = "start one with `infernode up` or pass --nats-url"


class BusError(ConnectionError):
    """The first connection to NATS failed; the message says what to do."""

    def __init__(self, url: str, reason: str, hint: str = REACH_HINT) -> None:
        self.url = url
        self.reason = reason
        self.hint = hint
        verb = "cannot reach" if hint == REACH_HINT else "cannot connect to"
        super().__init__(f"{verb} NATS at {url}: {reason}; {hint}")


def refusal_hint(error: BaseException | None) -> str | None:
    """The fix for an error every retry would meet again (credentials, TLS); else None."""
    if isinstance(error, AuthorizationError):
        return AUTH_HINT
    text = str(error or "").lower()
    if "authorization violation" in text or "authentication" in text:
        return AUTH_HINT
    if isinstance(error, ssl.SSLError) or ("tls" in text and "required" in text):
        return TLS_HINT
    return None


class _ConnectionEvents:
    """nats-py callbacks that log, and remember the last error for the first connect."""

    def __init__(self, name: str, fail_fast_after: int = 0) -> None:
        self.log = log.bind(connection=name)
        self.fail_fast_after = fail_fast_after
        """Unreachable addresses that end the first connect (0: never, retry to the deadline)."""
        self.unreachable = 0
        self.nc: Client | None = None
        self.connected = False
        self.last_error: BaseException | None = None
        self.refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        """Resolves with a hint when the server refused what every retry would send again."""
        self.refusal: BaseException | None = None
        """The error that said so (later ones, such as the reset that follows, are noise)."""

    async def on_error(self, error: Exception) -> None:
        self.last_error = error
        hint = refusal_hint(error)
        if hint is None and self.fail_fast_after and isinstance(error, OSError):
            # Nothing listens at any given address: a one-shot command says so at once
            # instead of retrying until its deadline.
            self.unreachable += 1
            if self.unreachable >= self.fail_fast_after:
                hint = REACH_HINT
        if hint is not None and not self.connected and not self.refused.done():
            self.refusal = error
            self.refused.set_result(hint)
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
    fail_fast: bool = False,
) -> Client:
    """A connected client named ``name`` to ``url`` (or ``config.nats_url``), or BusError.

    ``fail_fast`` ends the first connect once every address refused it or was unreachable,
    for one-shot commands; the node itself keeps trying until ``timeout``.
    """
    options = config.nats_connect_options(url, name)
    shown = ",".join(options["servers"])
    events = _ConnectionEvents(name, len(options["servers"]) if fail_fast else 0)
    nc = Client()
    events.nc = nc
    attempt = asyncio.ensure_future(
        nc.connect(
            **options,
            error_cb=events.on_error,
            disconnected_cb=events.on_disconnected,
            reconnected_cb=events.on_reconnected,
        )
    )
    try:
        either: set[asyncio.Future[Any]] = {attempt, events.refused}
        await asyncio.wait(either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not attempt.done():
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)
            await _abandon(nc)
            error = events.refusal or events.last_error
            reason = _describe(error) or f"no answer within {timeout:g} s"
            hint = events.refused.result() if events.refused.done() else REACH_HINT
            raise BusError(shown, reason, hint) from error
        attempt.result()
    except BusError:
        raise
    except Exception as e:
        await _abandon(nc)
        error = events.refusal or e
        hint = refusal_hint(error) or REACH_HINT
        raise BusError(shown, _describe(error) or type(error).__name__, hint) from error
    finally:
        events.refused.cancel()
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
