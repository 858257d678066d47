"""The systems ``bench/anchor.py`` and ``bench/window.py`` drive with one workload: infernode
(a session per conversation, only new messages sent over NATS) and the OpenAI servers
(``llama-server``, ``llama_cpp.server``: the whole conversation resent every call, as their
clients do).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench.llama_server import (
    Streamed,
    free_port,
    http_server,
    llama_cpp_python_cmd,
    llama_server_cmd,
    stream_chat,
)
from node.app import Node
from node.client import InfernodeClient, TurnResult
from node.config import NodeConfig
from schemas.chat import ChatMessage, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


class Side(Protocol):
    """One system under test, holding its conversations."""

    name: str

    async def chat(self, session: str, new: Sequence[dict[str, str]], max_tokens: int) -> Streamed:
        """Append ``new`` to ``session``'s conversation and stream the reply."""
        ...


@dataclass(frozen=True)
class Setup:
    """What every system gets alike."""

    model: Path
    """The GGUF."""
    threads: int
    """Threads per evaluation (and per batch)."""
    n_ctx: int
    """Context length of one slot (one conversation)."""
    slots: int
    """The node's slots; llama-server gets as many (-np)."""
    overflow: str = "truncate"
    """The node's window policy (``bench/window.py`` sets shift)."""
    bank_ram_bytes: int = 4 << 30
    """The node's RAM bank; 0 turns snapshots off (``bench/warm_turn.py`` compares)."""


class HttpSide:
    """An OpenAI server: the client keeps each conversation and resends it whole."""

    def __init__(self, name: str, base: str, extra: dict[str, object] | None = None) -> None:
        self.name = name
        self.base = base
        self.extra = extra
        self.conversations: dict[str, list[dict[str, str]]] = {}

    async def chat(self, session: str, new: Sequence[dict[str, str]], max_tokens: int) -> Streamed:
        conv = self.conversations.setdefault(session, [])
        conv.extend(new)
        out = await stream_chat(self.base, conv, max_tokens, self.extra)
        conv.append({"role": "assistant", "content": out.text})
        return out


class NodeSide:
    """infernode: the node keeps each conversation; a turn sends only its new messages."""

    def __init__(self, name: str, client: InfernodeClient) -> None:
        self.name = name
        self.client = client
        self.last: TurnResult | None = None
        """The events of the latest turn (the engine's own timings are in ``done``)."""

    async def chat(self, session: str, new: Sequence[dict[str, str]], max_tokens: int) -> Streamed:
        messages = [ChatMessage.model_validate(m) for m in new]
        result = TurnResult()
        start = time.perf_counter()
        first: float | None = None
        async for _token in self.client.prompt(session, messages, sampling=GREEDY,
                                               max_tokens=max_tokens, result=result):
            first = first or time.perf_counter()
        end = time.perf_counter()
        self.last = result
        usage: dict[str, object] = {}
        if result.done is not None:
            usage = result.done.usage.model_dump()
            # The engine's own account of the turn, for the benchmarks' breakdowns.
            usage["timings"] = result.done.timings.model_dump()
        return Streamed(((first or end) - start) * 1000, result.text, usage, end)


@contextlib.asynccontextmanager
async def node_side(name: str, engine: str, setup: Setup) -> AsyncIterator[NodeSide | str]:
    """An embedded node on ``engine``; a sentence instead when it does not load the model."""
    with tempfile.TemporaryDirectory() as tmp:
        config = NodeConfig(data_dir=Path(tmp), model=setup.model, engine=engine,
                            threads=setup.threads, n_ctx=setup.n_ctx, n_slots=setup.slots,
                            overflow=setup.overflow, log_level="warning",
                            bank_ram_bytes=setup.bank_ram_bytes, bank_session_bytes=1 << 30,
                            # The agents of one mesh, as its operator would declare them: the
                            # anchors share cached prefixes among all their clients.
                            bank_share_groups="mesh=*")
        try:
            node = Node(config)
            await node.__aenter__()
        except Exception as e:  # noqa: BLE001 - the reason is what the table prints
            yield f"n/a ({engine} engine did not start: {str(e).splitlines()[0][:160]})"
            return
        try:
            async with InfernodeClient(node.url, config=node.config) as client:
                yield NodeSide(name, client)
        finally:
            await node.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def llama_server_side(binary: Path, setup: Setup, extra: Sequence[str] = (),
                            name: str = "llama-server") -> AsyncIterator[HttpSide | str]:
    """``llama-server`` with ``--cache-ram`` and the node's number of slots."""
    port = free_port()
    cmd = llama_server_cmd(binary, setup.model, port, setup.threads, setup.n_ctx, setup.slots,
                           extra)
    async with http_server(cmd, port, name) as base:
        yield HttpSide(name, base) if base else f"n/a ({name} did not start; see stderr)"


@contextlib.asynccontextmanager
async def llama_cpp_python_side(setup: Setup) -> AsyncIterator[HttpSide | str]:
    """llama-cpp-python's server with ``--cache true``."""
    port = free_port()
    cmd = llama_cpp_python_cmd(setup.model, port, setup.threads, setup.n_ctx)
    async with http_server(cmd, port, "llama_cpp.server") as base:
        yield (HttpSide("llama_cpp.server", base) if base
               else "n/a (llama_cpp.server did not start; see stderr)")
