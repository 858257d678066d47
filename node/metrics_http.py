"""A Prometheus text endpoint (``--metrics-port``) beside the NATS admin subjects.

It holds no numbers of its own: each scrape asks ``<prefix>.admin.metrics`` over NATS and
renders every numeric field of the reply as a gauge named ``infernode_<path>`` (``_total``
names as counters). So the endpoint says exactly what the admin subject says.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import structlog
from nats.aio.client import Client

from schemas.subjects import AdminVerb, Subjects

log = structlog.get_logger("metrics_http")

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")
_MAX_REQUEST_BYTES = 8192


def flatten_numbers(value: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict, named by their path joined with ``_``."""
    out: dict[str, float] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            if k != "type":
                out.update(flatten_numbers(v, f"{prefix}_{k}" if prefix else str(k)))
    elif isinstance(value, bool | int | float):
        out[prefix] = float(value)
    return out


def prometheus_text(numbers: dict[str, float], up: bool = True) -> str:
    """Prometheus exposition text of ``numbers``."""
    lines = [
        "# HELP infernode_up Whether the node answered the scrape.",
        "# TYPE infernode_up gauge",
        f"infernode_up {1 if up else 0}",
    ]
    for raw, value in sorted(numbers.items()):
        name = "infernode_" + _NAME_BAD.sub("_", raw).strip("_")
        kind = "counter" if name.endswith("_total") else "gauge"
        lines += [f"# TYPE {name} {kind}", f"{name} {value:.6g}"]
    return "\n".join(lines) + "\n"


class MetricsHttp:
    """Serves ``GET /metrics``; anything else is 404."""

    def __init__(
        self, nc: Client, subjects: Subjects, port: int, host: str = "127.0.0.1",
        timeout: float = 5.0,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
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

    async def scrape(self) -> str:
        """The text of one scrape."""
        try:
            msg = await self.nc.request(
                self.subjects.admin(AdminVerb.METRICS), b"{}", timeout=self.timeout
            )
            numbers = flatten_numbers(json.loads(msg.data))
            return prometheus_text(numbers)
        except Exception as e:
            log.warning("metrics_scrape_failed", error=str(e) or type(e).__name__)
            return prometheus_text({}, up=False)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.close()
            return
        request_line = head[:_MAX_REQUEST_BYTES].split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
            status, body = "200 OK", (await self.scrape()).encode()
            ctype = "text/plain; version=0.0.4; charset=utf-8"
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
