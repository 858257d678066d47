"""Connections held open at the OpenAI gateway starve nobody: open connections are capped per
client address and in all; past a cap an idle connection (a socket held open sending
nothing) is closed to make room, so a fresh client is served; with none idle the newcomer
is refused at once with an OpenAI error object. Linux routes all of 127.0.0.0/8 to
loopback, so 127.0.0.2 and 127.0.0.3 are other client addresses here."""

from __future__ import annotations

import asyncio
import time

import httpx

from actors.gateway.connections import ConnectionTable
from tests.helpers import until

CHAT = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "temperature": 0}


class Idle:
    """A stand-in connection for the table's own rules."""

    def __init__(self, address: str, since: float | None) -> None:
        self.address = address
        self.since = since
        self.evicted = False

    def idle_since(self) -> float | None:
        return self.since

    def evict(self) -> None:
        self.evicted = True


Held = list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]


async def _hold(port: int, n: int, source: str = "127.0.0.1") -> Held:
    """Open ``n`` sockets from ``source`` that send nothing."""
    return [await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            for _ in range(n)]


async def _closed_by_server(held: Held, within: float) -> int:
    """How many of ``held`` the gateway closed (or refused with a response) within
    ``within`` seconds."""
    async def closed(reader: asyncio.StreamReader) -> bool:
        try:
            await asyncio.wait_for(reader.read(), within)
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        return True

    return sum(await asyncio.gather(*(closed(r) for r, _ in held)))


def _release(held: Held) -> None:
    for _, writer in held:
        writer.close()


async def _get(port: int, source: str) -> httpx.Response:
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(transport=transport, timeout=10) as http:
        return await http.get(f"http://127.0.0.1:{port}/v1/models")


def test_an_address_at_its_cap_makes_room_by_closing_its_oldest_idle_connection():
    """Idle past the grace: the oldest goes; busy or freshly opened: the newcomer is refused."""
    now = 100.0
    table = ConnectionTable(total=8, per_client=2, idle_grace_s=1.0, clock=lambda: now)
    old, busy = Idle("a", 90.0), Idle("a", None)
    assert table.admit(old) is None and table.admit(busy) is None
    assert table.admit(Idle("a", 100.0)) is None and old.evicted
    status, sentence = table.admit(Idle("a", 100.0)) or (0, "")
    assert status == 429 and "maximum of 2" in sentence and table.refused == 0


async def test_sockets_held_past_the_per_client_cap_are_refused_and_a_fresh_client_is_served(
    make_node,
):
    """60 sockets held from 127.0.0.1 under a cap of 16 per address: 44 are refused at once;
    a request from 127.0.0.1 itself and one from 127.0.0.2 are both answered."""
    node = await make_node(openai_port=0, openai_max_connections=64,
                           openai_max_connections_per_client=16, openai_header_timeout_s=30)
    port = node.gateway.port
    held = await _hold(port, 60)
    try:
        assert await _closed_by_server(held, within=3) == 44
        started = time.monotonic()
        for source in ("127.0.0.1", "127.0.0.2"):
            r = await _get(port, source)
            assert r.status_code == 200, (source, r.text)
        assert time.monotonic() - started < 5
    finally:
        _release(held)


async def test_a_gateway_full_of_held_sockets_makes_room_for_a_new_client(make_node):
    """80 sockets held from two addresses against a total of 32: a third address is served
    (an idle socket of the address holding the most is closed for it), within seconds."""
    node = await make_node(openai_port=0, openai_max_connections=32,
                           openai_max_connections_per_client=32, openai_header_timeout_s=30)
    port = node.gateway.port
    held = await _hold(port, 50, "127.0.0.2") + await _hold(port, 30, "127.0.0.3")
    try:
        assert await _closed_by_server(held, within=2) == 80 - 32
        started = time.monotonic()
        r = await _get(port, "127.0.0.4")
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 5
        assert node.gateway.connections.count <= 32
    finally:
        _release(held)


async def test_a_client_whose_connections_all_have_requests_running_is_refused_429(make_node):
    """With every connection of an address carrying a running request, the next connection
    from it gets a 429 error object with Retry-After, not a reset."""
    node = await make_node(openai_port=0, openai_max_connections=64,
                           openai_max_connections_per_client=2)
    port = node.gateway.port
    body = {**CHAT, "max_tokens": 4000}
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.5")
    async with httpx.AsyncClient(transport=transport, timeout=60) as http:
        running = [asyncio.ensure_future(
            http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                      headers={"X-Session-Id": f"long-{i}"})) for i in range(2)]
        table = node.gateway.connections
        await until(lambda: len(table.by_client.get("127.0.0.5", [])) == 2 and all(
            c.idle_since() is None for c in table.by_client["127.0.0.5"]),
            timeout=30, what="two requests running")
        r = await _get(port, "127.0.0.5")
        for call in running:
            call.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert "maximum of 2" in r.json()["error"]["message"]
