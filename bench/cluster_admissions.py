"""Durable admissions per second through a 3-server NATS cluster (replicas 3) next to one
nats-server (replicas 1): what keeping every prompt and record on three servers costs.

``bench/cluster.py`` prints this line among its own. Both sides run one ``infernode up`` on
the same model, started the same way, in that one run. Each prompt is append-only
(``reply: false``: recorded, no turn), so what is timed is admission: the intake stream, the
partition consumer, the session runner and the record log, from the first publish to the
last ``accepted`` event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg

from bench.common import Ratio
from node.nats_server import EmbeddedNats
from schemas.chat import ChatMessage
from schemas.messages import PromptRequest
from schemas.subjects import Subjects
from tests.nats_cluster import NatsCluster  # the cluster the tests start, routes on loopback

S = Subjects()
SESSIONS = 12


async def admissions_per_s(url: str, servers: list[str], prompts: int) -> float:
    """Append-only prompts admitted per second by the node at ``url``, over 12 sessions."""
    nc = await nats.connect(servers=servers)
    accepted = asyncio.Event()
    seen = 0

    async def on_accepted(msg: Msg) -> None:
        nonlocal seen
        seen += 1
        if seen >= prompts:
            accepted.set()

    try:
        await nc.subscribe(S.events("*", "accepted"), cb=on_accepted)
        await nc.flush()
        js = nc.jetstream()
        body = PromptRequest(messages=(ChatMessage(role="user", content="noted."),),
                             reply=False).model_dump_json().encode()
        start = time.perf_counter()
        await asyncio.gather(*(js.publish(S.prompt(f"adm-{i % SESSIONS}"), body)
                               for i in range(prompts)))
        await asyncio.wait_for(accepted.wait(), 300)
        return prompts / (time.perf_counter() - start)
    finally:
        await nc.close()


StartNode = Callable[..., Any]
"""Starts ``infernode up`` (url, data dir, model, flags…): bench/cluster.py's NodeChild."""


async def through(start: StartNode, url: str, servers: list[str], tmp: Path, model: Path,
                  replicas: int, prompts: int) -> float:
    """Admissions per second through one node with ``replicas`` on the NATS at ``url``."""
    node = start(url, tmp, model, "--replicas", str(replicas), "--bank-ram-bytes", "0")
    try:
        await node.wait_ready()
        return await admissions_per_s(url, servers, prompts)
    finally:
        node.stop()


async def measure(start: StartNode, tmp: Path, model: Path, prompts: int) -> Ratio:
    """The ratio line: cluster (replicas 3) admissions/s ÷ one server's (replicas 1)."""
    async with EmbeddedNats(tmp / "single") as server:
        single = await through(start, server.url, [server.url], tmp / "adm-1", model, 1,
                               prompts)
    async with NatsCluster(tmp / "cluster") as cluster:
        three = await through(start, cluster.url, cluster.urls, tmp / "adm-3", model, 3,
                              prompts)
    return Ratio(
        "admissions/s: 3 servers, replicas 3 / 1 server", three / single, 0.3, False,
        f"{three:.0f} admissions/s through 3 servers (replicas 3), {single:.0f} through one "
        f"(replicas 1); one node, {prompts} append-only prompts over {SESSIONS} sessions",
    )
