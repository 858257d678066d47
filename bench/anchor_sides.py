"""The systems ``bench/anchor.py`` and ``bench/window.py`` drive with one workload: infernode
(a session per conversation, only new messages sent over NATS) and the OpenAI servers
(``llama-server``, ``llama_cpp.server``: the whole conversation resent every call, as their
clients do).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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

    async def restart(self) -> None:
        """Stop the system and start it again, as after a crash or an upgrade."""
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
    cache_ram_mib: int | None = None
    """Host RAM for every system's prompt cache alike: llama-server's ``--cache-ram``,
    llama_cpp.server's ``--cache_size``, the node's bank RAM tier (``bank_ram_bytes``
    otherwise; llama-server then gets 2 GiB)."""
    node_threads: int | None = None
    """The node's ``--threads``; None gives it ``threads`` too (0: its own default)."""
    bank_dir: bool = False
    """Give the node a durable bank tier on disk (what a restart finds)."""
    node_flags: tuple[tuple[str, object], ...] = ()
    """Further node settings (name, value), as its flags would set them."""

    @property
    def node_bank_bytes(self) -> int:
        return self.bank_ram_bytes if self.cache_ram_mib is None else self.cache_ram_mib << 20


Restart = Callable[[], Awaitable[None]]


class HttpSide:
    """An OpenAI server: the client keeps each conversation and resends it whole."""

    def __init__(self, name: str, base: str, extra: dict[str, object] | None = None,
                 restart: Callable[[], Awaitable[str | None]] | None = None) -> None:
        self.name = name
        self.base = base
        self.extra = extra
        self.conversations: dict[str, list[dict[str, str]]] = {}
        self._restart = restart

    async def restart(self) -> None:
        """Stop the server and start it again: its caches are gone, the client's
        conversations stay."""
        if self._restart is None:
            raise RuntimeError(f"{self.name} cannot restart")
        base = await self._restart()
        if base is None:
            raise RuntimeError(f"{self.name} did not come back after its restart")
        self.base = base

    async def chat(self, session: str, new: Sequence[dict[str, str]], max_tokens: int) -> Streamed:
        conv = self.conversations.setdefault(session, [])
        conv.extend(new)
        out = await stream_chat(self.base, conv, max_tokens, self.extra)
        conv.append({"role": "assistant", "content": out.text})
        return out


class NodeSide:
    """infernode: the node keeps each conversation; a turn sends only its new messages."""

    def __init__(self, name: str, client: InfernodeClient,
                 restart: Callable[[], Awaitable[InfernodeClient]] | None = None) -> None:
        self.name = name
        self.client = client
        self.last: TurnResult | None = None
        """The events of the latest turn (the engine's own timings are in ``done``)."""
        self._restart = restart

    async def restart(self) -> None:
        """Stop the node and start it again on the same data: records and the bank's
        durable tier stay, its slots and RAM tier are gone."""
        if self._restart is None:
            raise RuntimeError(f"{self.name} cannot restart")
        self.client = await self._restart()

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


def _node_config(engine: str, setup: Setup, tmp: Path) -> NodeConfig:
    threads = setup.threads if setup.node_threads is None else setup.node_threads
    return NodeConfig(data_dir=tmp, model=setup.model, engine=engine,
                      threads=threads, n_ctx=setup.n_ctx, n_slots=setup.slots,
                      overflow=setup.overflow, log_level="warning",
                      bank_ram_bytes=setup.node_bank_bytes, bank_session_bytes=1 << 30,
                      bank_dir=tmp / "bank" if setup.bank_dir else None,
                      # The agents of one mesh, as its operator would declare them: the
                      # anchors share cached prefixes among all their clients.
                      bank_share_groups="mesh=*", **dict(setup.node_flags))


async def _open_node(config: NodeConfig) -> tuple[contextlib.AsyncExitStack, InfernodeClient]:
    stack = contextlib.AsyncExitStack()
    try:
        node = await stack.enter_async_context(Node(config))
        client = await stack.enter_async_context(InfernodeClient(node.url, config=node.config))
    except BaseException:
        await stack.aclose()
        raise
    return stack, client


@contextlib.asynccontextmanager
async def node_side(name: str, engine: str, setup: Setup) -> AsyncIterator[NodeSide | str]:
    """An embedded node on ``engine``; a sentence instead when it does not load the model."""
    with tempfile.TemporaryDirectory() as tmp:
        config = _node_config(engine, setup, Path(tmp))
        try:
            stack, client = await _open_node(config)
        except Exception as e:  # noqa: BLE001 - the reason is what the table prints
            yield f"n/a ({engine} engine did not start: {str(e).splitlines()[0][:160]})"
            return
        held = [stack]

        async def restart() -> InfernodeClient:
            await held[0].aclose()
            held[0], again = await _open_node(config)
            return again

        try:
            yield NodeSide(name, client, restart)
        finally:
            await held[0].aclose()


@contextlib.asynccontextmanager
async def _restartable(make: Callable[[int], list[str]], name: str
                       ) -> AsyncIterator[tuple[str | None, Callable[[], Awaitable[str | None]]]]:
    """A server from ``make(port)``, with a restart that starts it again on a fresh port."""
    held: list[contextlib.AsyncExitStack] = []

    async def start() -> str | None:
        stack = contextlib.AsyncExitStack()
        port = free_port()
        base = await stack.enter_async_context(http_server(make(port), port, name))
        held.append(stack)
        return base

    async def restart() -> str | None:
        await held.pop().aclose()
        return await start()

    base = await start()
    try:
        yield base, restart
    finally:
        while held:
            await held.pop().aclose()


@contextlib.asynccontextmanager
async def llama_server_side(binary: Path, setup: Setup, extra: Sequence[str] = (),
                            name: str = "llama-server") -> AsyncIterator[HttpSide | str]:
    """``llama-server`` with ``--cache-ram`` and the node's number of slots."""
    ram = 2048 if setup.cache_ram_mib is None else setup.cache_ram_mib

    def make(port: int) -> list[str]:
        return llama_server_cmd(binary, setup.model, port, setup.threads, setup.n_ctx,
                                setup.slots, extra, cache_ram_mib=ram)

    async with _restartable(make, name) as (base, restart):
        yield HttpSide(name, base, restart=restart) if base else \
            f"n/a ({name} did not start; see stderr)"


@contextlib.asynccontextmanager
async def llama_cpp_python_side(setup: Setup) -> AsyncIterator[HttpSide | str]:
    """llama-cpp-python's server with ``--cache true``."""
    size = None if setup.cache_ram_mib is None else setup.cache_ram_mib << 20

    def make(port: int) -> list[str]:
        return llama_cpp_python_cmd(setup.model, port, setup.threads, setup.n_ctx,
                                    cache_bytes=size)

    async with _restartable(make, "llama_cpp.server") as (base, restart):
        yield (HttpSide("llama_cpp.server", base, restart=restart) if base
               else "n/a (llama_cpp.server did not start; see stderr)")
