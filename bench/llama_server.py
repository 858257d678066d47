"""The anchors the benchmarks compare with: llama.cpp's C++ ``llama-server`` and
llama-cpp-python's ``llama_cpp.server``, started on a free port, and one streamed chat call.

``llama-server`` is found as ``--llama-server PATH``, else ``$INFERNODE_LLAMA_SERVER``, else
where ``bench/build_llama_server.sh`` puts it; when none is there a benchmark prints its
column as ``n/a`` with the command that builds it, and still exits 0. The build is never
part of the tests: it compiles llama.cpp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BUILD_SCRIPT = Path(__file__).resolve().with_name("build_llama_server.sh")
ENV_VAR = "INFERNODE_LLAMA_SERVER"
# llama-server's HTTP server closes a keep-alive connection after 5 requests; a client that
# reuses it then meets a reset mid-benchmark. One connection per request avoids that.
CLOSE = {"Connection": "close"}


def default_build_path() -> Path:
    """Where ``bench/build_llama_server.sh`` leaves the binary without an argument."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "infernode" / "llama-server" / "bin" / "llama-server"


def find_llama_server(path: Path | None) -> Path | None:
    """The ``llama-server`` binary: ``path``, the env var, the build script's place; or None."""
    env = os.environ.get(ENV_VAR)
    for candidate in (path, Path(env) if env else None, default_build_path()):
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def not_built_note() -> str:
    """What a benchmark prints in place of llama-server's numbers."""
    return ("n/a (llama-server not built: run bench/build_llama_server.sh, "
            f"or pass --llama-server PATH or set {ENV_VAR})")


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refuse_amx_where_it_faults(model: Path) -> None:
    """The node's probe on ``model``: on a CPU that reports AMX but faults on it, this process
    refuses AMX, and so does every server it starts after (a child inherits the refusal), so
    the anchors run the same AVX-512 kernels as the node instead of crashing."""
    from actors.engine.loader import probe_llamacpp

    probe_llamacpp(model)


def llama_server_cmd(binary: Path, model: Path, port: int, threads: int, n_ctx: int,
                     slots: int, extra: Sequence[str] = (), cache_ram_mib: int = 2048
                     ) -> list[str]:
    """``llama-server`` with ``slots`` slots of ``n_ctx`` tokens each and a RAM prompt cache of
    ``cache_ram_mib``; flash attention and batch sizes are its own defaults (auto, 2048/512)."""
    refuse_amx_where_it_faults(model)
    return [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-tb", str(threads), "-np", str(slots),
            # -c is the whole KV cache; each of the -np slots gets an equal share.
            "-c", str(n_ctx * slots), "--cache-ram", str(cache_ram_mib), "--no-webui",
            *extra]


def llama_cpp_python_cmd(model: Path, port: int, threads: int, n_ctx: int,
                         cache_bytes: int | None = None) -> list[str]:
    """llama-cpp-python's OpenAI server with its RAM prompt cache (``cache_bytes``, else its
    default of 2 GiB)."""
    refuse_amx_where_it_faults(model)
    size = [] if cache_bytes is None else ["--cache_size", str(cache_bytes)]
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--cache", "true",
            *size,
            "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--verbose", "false",
            # Its default cuts a running stream when another request arrives; queue instead.
            "--interrupt_requests", "false"]


@contextlib.asynccontextmanager
async def http_server(cmd: list[str], port: int, name: str) -> AsyncIterator[str | None]:
    """Run ``cmd`` until the block ends; yield its ``/v1`` base URL, or None (and a line on
    stderr saying why) when it does not come up."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed after the process ends
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        if await _ready(proc, base):
            yield base
        else:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
            print(f"{name} did not start: {' | '.join(tail)}", file=sys.stderr)
            yield None
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


async def _ready(proc: subprocess.Popen[bytes], base: str, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2, headers=CLOSE) as http:
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{base}/models")).status_code == 200:
                    return True
            await asyncio.sleep(0.1)
    return False


@dataclass
class Streamed:
    """One streamed chat completion as the client saw it."""

    ttft_ms: float
    """From sending the request to the first content delta."""
    text: str
    """The reply."""
    usage: dict[str, object] = field(default_factory=dict)
    """The server's usage object, when it sends one."""
    end: float = 0.0
    """``time.perf_counter()`` when the stream ended."""
    chunks: int = 0
    """Chunks that carried content: a token each, for a server that sends no usage."""

    @property
    def completion_tokens(self) -> int:
        """Tokens generated: the server's usage, else the content chunks."""
        value = self.usage.get("completion_tokens")
        return value if isinstance(value, int) else self.chunks

    @property
    def cached_tokens(self) -> int:
        """``usage.prompt_tokens_details.cached_tokens`` (or llama.cpp's ``cached_tokens``
        at the top level); 0 when absent."""
        details = self.usage.get("prompt_tokens_details")
        value = details.get("cached_tokens") if isinstance(details, dict) else None
        value = self.usage.get("cached_tokens") if value is None else value
        timings = self.usage.get("timings")
        if value is None and isinstance(timings, dict):
            value = timings.get("cache_n")
        return value if isinstance(value, int) else 0


async def stream_chat(base: str, messages: Sequence[dict[str, str]], max_tokens: int,
                      extra: dict[str, object] | None = None) -> Streamed:
    """Send ``messages`` (the whole conversation) and read the greedy streamed reply."""
    body = {"model": "bench", "messages": list(messages), "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            **(extra or {})}
    start, ttft, pieces = time.perf_counter(), None, []
    usage: dict[str, object] = {}
    async with httpx.AsyncClient(timeout=600, headers=CLOSE) as http, \
            http.stream("POST", f"{base}/chat/completions", json=body) as response:
        if response.is_error:  # the server's own sentence says why
            await response.aread()
            raise httpx.HTTPStatusError(
                f"{response.status_code} from {base}: {response.text[:300]}",
                request=response.request, response=response)
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if isinstance(chunk.get("usage"), dict):
                usage = {**usage, **chunk["usage"]}
            if isinstance(chunk.get("timings"), dict):  # llama-server's own counts
                usage = {**usage, "timings": chunk["timings"]}
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = (time.perf_counter() - start) * 1000
                if piece:
                    pieces.append(piece)
    end = time.perf_counter()
    return Streamed(ttft if ttft is not None else (end - start) * 1000, "".join(pieces),
                    usage, end, len(pieces))
