"""Operating infernode: the client, relays, the metrics endpoint, the micro service, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import pytest

from node.client import InfernodeClient, TurnAborted
from node.mesh import run_mesh
from schemas.chat import SamplingParams
from schemas.errors import ErrorCode, InferError
from schemas.subjects import Subjects
from tests.helpers import EventCollector

GREEDY = SamplingParams(temperature=0.0)
S = Subjects()


async def test_client_streams_a_turn_then_reads_history_and_sessions(make_node):
    """Given a node, when the client prompts twice, then history and sessions show both turns."""
    node = await make_node()
    async with InfernodeClient(node.url) as c:
        chunks = [t.text async for t in c.prompt("cl-1", "hello", sampling=GREEDY, max_tokens=6)]
        second = await c.complete("cl-1", "again", sampling=GREEDY, max_tokens=6)
        history = await c.history("cl-1")
        sessions = await c.sessions()
    assert "".join(chunks)
    assert second.commit is not None and second.commit.generation == 2
    assert second.done is not None and second.done.usage.cached_tokens > 0
    kinds = [r.kind for r in history.records]
    assert kinds.count("commit") == 2 and kinds.count("user") == 2
    assert history.generation == 2
    summary = {s.session: s for s in sessions.sessions}
    assert summary["cl-1"].generation == 2


async def test_client_raises_typed_errors_from_error_events(make_node):
    """Given a session at generation 1, a prompt expecting generation 5 raises a 409 InferError."""
    node = await make_node()
    async with InfernodeClient(node.url) as c:
        await c.complete("cl-2", "hello", sampling=GREEDY, max_tokens=4)
        with pytest.raises(InferError) as raised:
            await c.complete("cl-2", "stale", expect_generation=5, max_tokens=4)
        with pytest.raises(InferError) as bad:
            await c.complete("not.valid", "hi")
    assert raised.value.code == ErrorCode.CONFLICT and raised.value.status == 409
    assert bad.value.code == ErrorCode.BAD_REQUEST


async def test_client_abort_raises_turn_aborted_for_the_prompting_agent(make_node):
    """Given a long turn, when another client aborts it, the prompting client gets TurnAborted."""
    node = await make_node()
    async with InfernodeClient(node.url) as c, InfernodeClient(node.url) as other:
        tokens = c.prompt("cl-3", "write a lot", max_tokens=4000, sampling=GREEDY)
        first = await tokens.__anext__()
        assert first.text
        reply = await other.abort("cl-3")
        assert reply.aborted
        with pytest.raises(TurnAborted):
            async for _ in tokens:
                pass


async def test_relay_to_sends_the_answer_as_a_prompt_to_the_other_session(make_node, nc):
    """Given relay_to and the target's grant, the answer arrives as a user message there."""
    node = await make_node()
    target = await EventCollector.start(nc, S.events_all("relay-b"))
    async with InfernodeClient(node.url) as c:
        await c.accept_relays("relay-b", ["relay-a"])
        result = await c.complete("relay-a", "pass this on", relay_to="relay-b", max_tokens=6,
                             sampling=GREEDY)
        await target.wait_until(lambda ms: any(m.subject.endswith(".commit") for m in ms), 60)
        history = await c.history("relay-b")
    users = [r for r in history.records if r.kind == "user"]
    assert [u.content for u in users] == [result.text]
    done = next(json.loads(m.data) for m in target.messages if m.subject.endswith(".done"))
    assert done["usage"]["completion_tokens"] <= 6  # the source's max_tokens travels along


async def test_mesh_demo_passes_answers_around_the_ring(make_node):
    """Given three agents, one round of the mesh gives each agent a hop and prints who said what."""
    node = await make_node()
    said: list[str] = []
    async with InfernodeClient(node.url) as c:
        report = await run_mesh(c, agents=3, rounds=1, max_tokens=6, say=said.append, timeout=60)
    assert report.hops == 3
    spoke = {who for who, _ in report.answers}
    assert spoke == {"mesh-0", "mesh-1", "mesh-2"}
    assert any(line.startswith("mesh-1: ") for line in said)


async def _http_get(port: int, path: str) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = (await asyncio.wait_for(reader.read(), 10)).decode()
    writer.close()
    head, _, body = raw.partition("\r\n\r\n")
    return head.split("\r\n")[0], body


async def test_metrics_endpoint_serves_prometheus_text_with_request_and_cache_numbers(make_node):
    """Given --metrics-port, a scrape after two turns shows sessions, turns and token counters."""
    node = await make_node(metrics_port=0)
    assert node.metrics_http is not None
    async with InfernodeClient(node.url) as c:
        await c.complete("m-1", "hello", sampling=GREEDY, max_tokens=4)
        await c.complete("m-1", "again", sampling=GREEDY, max_tokens=4)
    status, body = await _http_get(node.metrics_http.port, "/metrics")
    assert status.endswith("200 OK")
    values = {
        line.split()[0]: float(line.split()[1])
        for line in body.splitlines() if line and not line.startswith("#")
    }
    assert values["infernode_sessions"] == 1
    assert values["infernode_turns_total"] == 2
    assert values["infernode_time_to_first_token_seconds_count"] == 2
    assert values["infernode_cached_prompt_tokens_total"] > 0
    # Exact, not printed with 6 significant digits: the default 1 GiB reads back as itself.
    assert values["infernode_bank_ram_capacity_bytes"] == 1 << 30
    missing, _ = await _http_get(node.metrics_http.port, "/nope")
    assert missing.endswith("404 Not Found")


async def test_node_answers_micro_service_ping_and_info(make_node, nc):
    """Given a node, $SRV.PING.infernode and $SRV.INFO.infernode answer with its metadata."""
    await make_node()
    ping = json.loads((await nc.request("$SRV.PING.infernode", b"", timeout=5)).data)
    info = json.loads((await nc.request("$SRV.INFO.infernode", b"", timeout=5)).data)
    assert ping["name"] == "infernode"
    assert info["metadata"]["prefix"] == "infer"


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args, "--nats-url", url],
        env=env, capture_output=True, text=True, timeout=60,
    )


async def test_cli_sessions_history_metrics_health_and_abort_read_the_node(make_node):
    """Given a session with one turn, the admin commands print it and exit 0."""
    node = await make_node()
    async with InfernodeClient(node.url) as c:
        await c.complete("cli-s", "hello", sampling=GREEDY, max_tokens=4)
    runs = {
        name: await asyncio.to_thread(_cli, node.url, *argv)
        for name, argv in {
            "sessions": ["sessions"], "history": ["history", "cli-s"], "metrics": ["metrics"],
            "health": ["health"], "abort": ["abort", "cli-s"], "json": ["sessions", "--json"],
            "missing": ["history", "nobody"],
        }.items()
    }
    for name in ("sessions", "history", "metrics", "health", "abort", "json"):
        assert runs[name].returncode == 0, (name, runs[name].stderr)
    assert "cli-s" in runs["sessions"].stdout
    assert "generation 1" in runs["history"].stdout and "commit" in runs["history"].stdout
    assert re.search(r"^infernode_sessions +1$", runs["metrics"].stdout, re.M)
    assert "no turn was running" in runs["abort"].stdout
    assert json.loads(runs["json"].stdout)["sessions"][0]["session"] == "cli-s"
    assert runs["missing"].returncode == 1 and "404" in runs["missing"].stderr
    assert "Traceback" not in runs["missing"].stderr
