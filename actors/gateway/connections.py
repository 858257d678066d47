"""Open connections by client address, capped per address and in all, at the connection level.

uvicorn's own ``limit_concurrency`` counts requests in all and cannot tell one client from
another: 2,000 sockets held open by one client starve everyone. Here every connection is
counted against its client address and against the total. A connection past a cap first
makes room by closing an *idle* connection (no request in progress for ``idle_grace_s``:
a held-open socket, a slow-loris one still dribbling headers, a kept-alive one nobody
uses), the address's own when it is over its cap, else the oldest of the address holding
the most. So a client holding idle sockets loses them to newcomers, and a new client is
served within the grace however many sockets are held. Only when every connection in the
way has a request running is the newcomer refused: a 429 (its address is at its cap) or a
503 (the gateway is full) error object with ``Retry-After``, written at once, after which
the socket is closed within ``_LINGER_S`` (what the client sends meanwhile is discarded,
so the close is clean); with ``total`` refusals lingering already, a newcomer is reset
instead, so open sockets stay under twice the total.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from actors.gateway.responses import error_body
from schemas.errors import ErrorCode

_LINGER_S = 1.0
"""How long a refused socket stays open so its client reads the refusal (not a reset)."""
_REASONS = {429: "Too Many Requests", 503: "Service Unavailable"}


class Tracked(Protocol):
    """What the table needs of a connection."""

    address: str
    """The client's address (its IP)."""

    def idle_since(self) -> float | None:
        """``time.monotonic()`` since which no request runs on it; None while one runs."""
        ...

    def evict(self) -> None:
        """Close it to make room."""
        ...


@dataclass
class ConnectionTable:
    """The gateway's open connections, by client address, oldest first."""

    total: int
    """Most open connections in all."""
    per_client: int
    """Most open connections from one address."""
    idle_grace_s: float = 1.0
    """A connection idle this long may be closed to make room for a new one."""
    clock: Callable[[], float] = time.monotonic
    by_client: dict[str, list[Tracked]] = field(default_factory=dict)
    count: int = 0
    refused: int = 0
    """Connections refused (every connection in the way had a request running)."""
    evicted: int = 0
    """Idle connections closed to make room."""
    lingering: int = 0
    """Refused sockets still open while their refusal is read."""

    def admit(self, conn: Tracked) -> tuple[int, str] | None:
        """Count ``conn`` in (closing an idle one to make room); or why not: a status and a
        sentence."""
        mine = self.by_client.get(conn.address, [])
        if len(mine) >= self.per_client:
            if not self._evict_from(mine):
                return 429, (f"this address holds its maximum of {self.per_client} "
                             "connections, each with a request running; retry shortly")
        elif self.count >= self.total and not self._evict_anywhere():
            return 503, (f"the gateway holds its maximum of {self.total} connections, each "
                         "with a request running; retry shortly")
        self.by_client.setdefault(conn.address, []).append(conn)
        self.count += 1
        return None

    def remove(self, conn: Tracked) -> None:
        """``conn`` closed (idempotent)."""
        mine = self.by_client.get(conn.address)
        if mine is None or conn not in mine:
            return
        mine.remove(conn)
        self.count -= 1
        if not mine:
            del self.by_client[conn.address]

    def _evict_from(self, conns: list[Tracked]) -> bool:
        now = self.clock()
        for conn in conns:  # oldest first
            since = conn.idle_since()
            if since is not None and now - since >= self.idle_grace_s:
                self.remove(conn)
                self.evicted += 1
                conn.evict()
                return True
        return False

    def _evict_anywhere(self) -> bool:
        """Room made by the address holding the most connections, else by any."""
        ranked = sorted(self.by_client.values(), key=len, reverse=True)
        return any(self._evict_from(list(conns)) for conns in ranked)


def refusal_bytes(status: int, sentence: str) -> bytes:
    """A whole HTTP/1.1 response: an OpenAI error object, ``Retry-After``, then close."""
    code = ErrorCode.BUSY if status == 429 else ErrorCode.UNAVAILABLE
    body = json.dumps(error_body(status, sentence, code.value)).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def refuse(transport: asyncio.Transport, table: ConnectionTable, status: int,
           sentence: str) -> None:
    """Answer a refused connection at once, then close it (at once if too many linger)."""
    table.refused += 1
    if table.lingering >= table.total:
        transport.abort()  # refusals must not become a way to hold sockets: at most 2x
        return
    transport.write(refusal_bytes(status, sentence))
    if transport.can_write_eof():
        transport.write_eof()
    table.lingering += 1

    def close() -> None:
        table.lingering -= 1
        transport.close()

    asyncio.get_running_loop().call_later(_LINGER_S, close)
