"""A logging HTTP proxy for coding agents: forwards every request to a node's gateway and
records it, so the requests real clients send (and the streams they get) can be read back.

Each exchange is one JSON line: method, path, the request's headers (credentials dropped) and
body, the status, the response's headers, and the response body as chunks with their times
in seconds since the request arrived. ``bench/agents.py`` reads TTFT and usage from it; the
replay fixtures under ``tests/fixtures/agents/`` were cut from such logs.

    python -m bench.agent_proxy --upstream http://127.0.0.1:8000 --port 8001 --log log.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

SECRET_HEADERS = frozenset({"authorization", "x-api-key", "cookie", "proxy-authorization"})
# Hop-by-hop headers and those httpx recomputes for the forwarded body.
_NOT_FORWARDED = frozenset({"host", "content-length", "connection", "transfer-encoding",
                            "accept-encoding"})
_NOT_RETURNED = frozenset({"content-length", "transfer-encoding", "connection",
                           "content-encoding"})


def public_headers(headers: Any) -> dict[str, str]:
    """The headers of a request as recorded: lower-cased names, credentials left out."""
    return {k.lower(): v for k, v in headers.items() if k.lower() not in SECRET_HEADERS}


def _body(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", "replace")


class AgentProxy:
    """Forwards to ``upstream`` and appends one record per exchange to ``log``."""

    def __init__(self, upstream: str, log: Path) -> None:
        self.upstream = upstream.rstrip("/")
        self.log = log
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(None), http2=False)
        self.app = Starlette(routes=[Route("/{path:path}", self.forward,
                                           methods=["GET", "POST", "PUT", "DELETE", "HEAD"])])

    async def forward(self, request: Request) -> StreamingResponse:
        """Sends the request on and streams the answer back while recording it."""
        start = time.monotonic()
        raw = await request.body()
        url = f"{self.upstream}{request.url.path}"
        if request.url.query:
            url += f"?{request.url.query}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        upstream = await self._http.send(
            self._http.build_request(request.method, url, headers=headers, content=raw),
            stream=True)
        record: dict[str, Any] = {
            "wall": time.time(), "method": request.method, "path": request.url.path,
            "headers": public_headers(request.headers), "body": _body(raw),
            "status": upstream.status_code,
            "response_headers": public_headers(upstream.headers), "chunks": []}
        back = {k: v for k, v in upstream.headers.items() if k.lower() not in _NOT_RETURNED}
        return StreamingResponse(self._relay(upstream, record, start),
                                 status_code=upstream.status_code, headers=back)

    async def _relay(self, upstream: httpx.Response, record: dict[str, Any],
                     start: float) -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                record["chunks"].append([round(time.monotonic() - start, 4),
                                         chunk.decode("utf-8", "replace")])
                yield chunk
        finally:
            await upstream.aclose()
            record["seconds"] = round(time.monotonic() - start, 4)
            with self.log.open("a") as f:
                f.write(json.dumps(record) + "\n")

    async def aclose(self) -> None:
        await self._http.aclose()


async def serve(upstream: str, port: int, log: Path) -> None:
    """Runs the proxy on ``127.0.0.1:port`` until cancelled."""
    proxy = AgentProxy(upstream, log)
    server = uvicorn.Server(uvicorn.Config(proxy.app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    try:
        await server.serve()
    finally:
        await proxy.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", default="http://127.0.0.1:8000")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--log", type=Path, default=Path("agent_proxy.jsonl"))
    args = parser.parse_args()
    asyncio.run(serve(args.upstream, args.port, args.log))


if __name__ == "__main__":
    main()
