"""A Prometheus text endpoint (``--metrics-port``) beside the NATS admin subjects.

It holds no numbers of its own: each scrape renders the node's collector (node/metrics.py)
with prometheus_client, the same families ``<prefix>.admin.metrics`` answers with.
"""

from __future__ import annotations

import asyncio

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = structlog.get_logger("metrics_http")

_MAX_REQUEST_BYTES = 8192


class MetricsHttp:
    """Serves ``GET /metrics``; anything else is 404."""

    def __init__(
        self, registry: CollectorRegistry, port: int, host: str = "127.0.0.1",
        timeout: float = 5.0,
    ) -> None:
        self.registry = registry
        self.port = port
        self.host = host
        self.timeout = timeout
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen (port 0 picks a free one; ``self.port`` then holds it)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        log.info("metrics_http_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def scrape(self) -> bytes:
        """The text of one scrape.

        Collected on the event loop, where the actors change their counters, so a scrape
        never sees a dict in the middle of an update.
        """
        return generate_latest(self.registry)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        request_line = head[:_MAX_REQUEST_BYTES].split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
            status, body, ctype = "200 OK", self.scrape(), CONTENT_TYPE_LATEST
        else:
            status, ctype = "404 Not Found", "text/plain"
            body = b"only GET /metrics is served here\n"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode() + body
        )
        try:
            await writer.drain()
        finally:
            writer.close()
