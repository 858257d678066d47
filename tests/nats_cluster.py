"""A JetStream cluster of real nats-servers on loopback, for the tests of many nodes.

Each member is an ``EmbeddedNats`` (the one-server fixture's own class) with a name, its
own store directory and routes to every member. The route and monitor ports are chosen
free together before the start, since each member's routes must name the others' ports.
``start`` returns once the members agree on a JetStream meta leader that sees every peer
(read from each member's ``/jsz``), so a stream with one replica per member can be placed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from nats.aio.client import Client

from node.nats_server import EmbeddedNats

T = TypeVar("T")
POLL_S = 0.1
"""Between two reads of a server's state while waiting for it to change (a deadline bounds
the wait; the interval only keeps the poll from spinning on shared cores)."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free now (all held open at once while chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


async def poll(
    read: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float, what: str
) -> T:
    """Read until ``done(value)`` holds (a failed read counts as not yet); fail at the
    deadline naming ``what`` and the last value or error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    while loop.time() < deadline:
        try:
            value = await read()
        except Exception as e:  # a server still electing answers with an error
            last = e
        else:
            if done(value):
                return value
            last = value
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"{what} did not happen within {timeout:g} s; last: {last!r}")


class NatsCluster:
    """``size`` nats-servers with JetStream, routed to each other; ``async with`` runs them."""

    def __init__(self, root: Path, size: int = 3, name: str = "infernode-test") -> None:
        self.root = root
        self.size = size
        self.name = name
        self.servers: dict[str, EmbeddedNats] = {}
        """Member name (its ``server_name``) → server, in start order."""
        self.monitor_ports: dict[str, int] = {}

    @property
    def urls(self) -> list[str]:
        """Client URLs of the members still running."""
        return [s.url for s in self.servers.values() if s.running]

    @property
    def url(self) -> str:
        """Every member's client URL, comma-separated, as ``--nats-url`` takes them."""
        return ",".join(s.url for s in self.servers.values())

    async def __aenter__(self) -> NatsCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, timeout: float = 30.0) -> None:
        """Start every member and wait until JetStream's meta group has a leader."""
        ports = free_ports(2 * self.size)
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in ports[: self.size])
        for i in range(self.size):
            name = f"n{i + 1}"
            self.monitor_ports[name] = ports[self.size + i]
            self.servers[name] = EmbeddedNats(self.root / name, extra_args=[
                "--server_name", name, "--cluster_name", self.name,
                "--cluster", f"nats://127.0.0.1:{ports[i]}", "--routes", routes,
                "--http_port", str(ports[self.size + i]),
            ])
        try:
            await asyncio.gather(*(s.start() for s in self.servers.values()))
            await self.wait_for_meta_leader(timeout)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every member still running."""
        await asyncio.gather(*(s.stop() for s in self.servers.values()))

    async def jsz(self, name: str) -> dict[str, Any]:
        """Member ``name``'s JetStream report (its monitor's ``/jsz``)."""
        return await self._monitor(name, "jsz")

    async def client_names(self, name: str) -> list[str]:
        """The names of the client connections member ``name`` holds (its ``/connz``)."""
        report = await self._monitor(name, "connz")
        return [c.get("name", "") for c in report.get("connections") or []]

    async def _monitor(self, name: str, endpoint: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as http:
            reply = await http.get(f"http://127.0.0.1:{self.monitor_ports[name]}/{endpoint}")
            reply.raise_for_status()
            return dict(reply.json())

    async def wait_for_meta_leader(self, timeout: float = 30.0) -> str:
        """The meta leader's name, once every running member names the same one and it
        counts every member as a peer."""
        running = [n for n, s in self.servers.items() if s.running]

        async def leaders() -> set[str]:
            reports = await asyncio.gather(*(self.jsz(n) for n in running))
            found = set()
            for report in reports:
                meta = report.get("meta_cluster") or {}
                if meta.get("cluster_size") != self.size:
                    return set()
                found.add(meta.get("leader") or "")
            return found

        agreed = await poll(leaders, lambda names: len(names) == 1 and "" not in names,
                            timeout, "a JetStream meta leader every member agrees on")
        return agreed.pop()

    async def kill(self, name: str) -> None:
        """SIGKILL member ``name`` (a crash: it writes nothing more)."""
        await self.servers[name].kill()

    @staticmethod
    async def stream_leader(nc: Client, stream: str) -> str:
        """The name of the member that leads ``stream`` (``$JS.API.STREAM.INFO``)."""
        info = await nc.jetstream().stream_info(stream)
        assert info.cluster is not None and info.cluster.leader, f"{stream} has no leader"
        return info.cluster.leader

    async def wait_for_stream_leader(
        self, nc: Client, stream: str, timeout: float = 30.0
    ) -> str:
        """The leader of ``stream`` once a running member leads it (after a leader died)."""
        running = {n for n, s in self.servers.items() if s.running}
        return await poll(lambda: self.stream_leader(nc, stream), lambda n: n in running,
                          timeout, f"a running leader of {stream}")
