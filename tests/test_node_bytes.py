"""The node-wide bound on message memory: every session's messages count against one cap
(``--max-node-bytes``); past it a prompt gets busy 429 with a sentence, admits to many
sessions at once cannot all slip under it, and deleting a session frees its share."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client

from node.client import InfernodeClient
from tests.fake_engine import FakeNode
from tests.support.sessions import Session, send

KIB = 1 << 10


def note(n_bytes: int) -> str:
    """A note of about ``n_bytes`` bytes of text."""
    return "x" * n_bytes


async def _outcome(watch: Session, key: str) -> dict:
    """The accepted or error event of the prompt with ``key``."""
    def mine() -> list[dict]:
        return [e for e in watch.of("accepted") + watch.of("error")
                if e.get("idempotency_key") == key]
    await watch.until(lambda s: bool(mine()))
    return mine()[0]


async def test_appends_past_the_node_wide_bound_get_busy_and_a_delete_frees_room(
    nats_server, nc: Client,
):
    """Given a 100 KiB node-wide bound, two sessions holding 40 KiB each take no third
    40 KiB append in another session (busy 429 naming the bound); once one of the two is
    deleted, the third session's append is recorded."""
    async with FakeNode(nats_server.url, heartbeat_s=0, max_node_bytes=100 * KIB) as node:
        watches = {s: await Session.watch(nc, s) for s in ("a", "b", "c")}
        for s in ("a", "b"):
            event = await _outcome(watches[s], await send(nc, s, note(40 * KIB), reply=False))
            assert "message_ids" in event, event
        refused = await _outcome(watches["c"], await send(nc, "c", note(40 * KIB), reply=False))
        assert refused["code"] == "busy" and refused["status"] == 429, refused
        assert str(100 * KIB) in refused["message"] and "--max-node-bytes" in refused["message"]
        assert node.host.held_bytes() <= 100 * KIB
        async with InfernodeClient(nats_server.url, nc=nc) as client:
            await client.delete("a")
        event = await _outcome(watches["c"], await send(nc, "c", note(40 * KIB), reply=False))
        assert "message_ids" in event, event


async def test_concurrent_appends_to_many_sessions_stay_under_the_node_wide_bound(
    nats_server, nc: Client,
):
    """Twenty 10 KiB appends to twenty sessions at once, under a 100 KiB node-wide bound:
    at most ten are recorded, the rest get busy, and the node holds no more than the bound."""
    async with FakeNode(nats_server.url, heartbeat_s=0, max_node_bytes=100 * KIB) as node:
        names = [f"many-{i}" for i in range(20)]
        watches = [await Session.watch(nc, s) for s in names]
        keys = await asyncio.gather(*(send(nc, s, note(10 * KIB), reply=False) for s in names))
        events = await asyncio.gather(*(_outcome(w, k) for w, k in zip(watches, keys, strict=True)))
        accepted = [e for e in events if "message_ids" in e]
        assert 1 <= len(accepted) <= 10, len(accepted)
        assert {e["code"] for e in events if "code" in e} == {"busy"}
        assert node.host.held_bytes() <= 100 * KIB
