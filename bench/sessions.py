"""Sessions benchmark: many agents, many sessions, every prompt answered exactly once.

    python bench/sessions.py                  # embedded node, demo tiny model
    python bench/sessions.py --model PATH.gguf --agents 32 --sessions 8 --prompts 2

It starts an embedded node (its own nats-server with JetStream) in this process, and the
agents in a child process (so their work does not share the node's event loop): 32 agents,
each on its own connection, publish prompts to 8 sessions each, all at once (2 prompts per
session; prompts that arrive during a turn are coalesced into the next). When every prompt
is a parent of a commit (or the timeout passes) it prints, measured in this one run:

- prompts answered ÷ prompts sent (must be 1.000) and duplicate replies (must be 0): a
  prompt named as a parent by more than one commit, or a turn committed twice;
- node overhead per turn = (runner + bus time) ÷ engine time, from each committed turn's
  ``chat_done`` log line: ``overhead_ms`` (the turn's wall time in the runner, less the
  engine's slot wait and compute) over ``total_ms`` (the engine's compute). With hundreds
  of turns in flight on one event loop this wall time includes waiting for the loop, so
  the same ratio in CPU time is printed beside it: (the node's event loop + nats-server)
  ÷ the engine's threads;
- latencies seen by the agents, and the node's RSS.

The demo model's weights are random and tiny: a turn costs the engine a few milliseconds,
so the ratio compares the node with about the smallest engine time there is; a real model
(``--model``) spends far longer per turn and lowers it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from nats.aio.client import Client  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from structlog.testing import capture_logs  # noqa: E402

from bench.common import (  # noqa: E402
    EventTally,
    client_env,
    connect_client,
    pct,
    run_agents_or_main,
)
from schemas.chat import ChatMessage, SamplingParams  # noqa: E402
from schemas.messages import PromptRequest  # noqa: E402
from schemas.subjects import MSG_ID_HEADER, Subjects  # noqa: E402

S = Subjects()


# -- the agents (child process) ---------------------------------------------------------------
@dataclass
class Agent(EventTally):
    """One agent: a connection, its sessions, and what it saw."""

    name: str
    sessions: list[str]
    nc: Client | None = None
    sent: dict[str, float] = field(default_factory=dict)
    """Idempotency key → publish time."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        EventTally.__init__(self)

    async def on_event(self, msg: Msg) -> None:
        _, kind = S.event_of(msg.subject)
        body = json.loads(msg.data)
        self.tally(kind, body, self.sent)
        if kind == "error":
            self.errors.append(body)
        self.changed.set()

    def answered(self) -> int:
        return sum(
            1 for k in self.sent if k in self.ids and all(self.parents[i] for i in self.ids[k])
        )

    def finished(self) -> bool:
        return self.answered() + len(self.errors) >= len(self.sent)


async def run_agent(agent: Agent, url: str, prompts: int, max_tokens: int) -> None:
    """Subscribe to its sessions' events, then publish every prompt at once."""
    agent.nc = nc = await connect_client(url, f"bench-{agent.name}")
    for session in agent.sessions:
        await nc.subscribe(S.events_all(session), cb=agent.on_event)
    await nc.flush()
    js = nc.jetstream()

    async def publish(session: str, n: int) -> None:
        key = uuid.uuid4().hex
        prompt = PromptRequest(
            messages=(ChatMessage(role="user", content=f"{agent.name} asks {session} #{n}"),),
            sampling=SamplingParams(temperature=0.0), max_tokens=max_tokens,
            idempotency_key=key,
        )
        agent.sent[key] = time.perf_counter()
        await js.publish(S.prompt(session), prompt.model_dump_json().encode(),
                         headers={MSG_ID_HEADER: key})

    await asyncio.gather(*(publish(s, n) for n in range(prompts) for s in agent.sessions))


async def wait_all(agents: list[Agent], timeout: float) -> bool:
    """Wait until every agent's prompts are answered (or errors explain the rest)."""
    deadline = time.perf_counter() + timeout
    while not all(a.finished() for a in agents):
        left = deadline - time.perf_counter()
        if left <= 0:
            return False
        waiting = [a for a in agents if not a.finished()]
        for a in waiting:
            a.changed.clear()
        _, pending = await asyncio.wait(
            [asyncio.ensure_future(a.changed.wait()) for a in waiting], timeout=left,
            return_when=asyncio.FIRST_COMPLETED,
        )
        for p in pending:
            p.cancel()
    return True



async def agents_main(args: argparse.Namespace) -> dict[str, Any]:
    """Run every agent against ``args.url``; a summary of what they saw."""
    agents = [
        Agent(f"agent{a}", [f"a{a}-s{s}" for s in range(args.sessions)])
        for a in range(args.agents)
    ]
    start = time.perf_counter()
    await asyncio.gather(*(run_agent(a, args.url, args.prompts, args.max_tokens) for a in agents))
    finished = await wait_all(agents, args.timeout)
    wall = time.perf_counter() - start
    for a in agents:
        if a.nc is not None:
            await a.nc.drain()
    errors = [e for a in agents for e in a.errors]
    accept_ms = [(a.accepted_at[k] - a.sent[k]) * 1000 for a in agents for k in a.accepted_at]
    answer_ms = [
        (a.answered_at[i] - a.sent[k]) * 1000
        for a in agents for k, ids in a.ids.items() for i in ids if i in a.answered_at
    ]
    return {
        "finished": finished, "wall_s": wall,
        "sent": sum(len(a.sent) for a in agents),
        "answered": sum(a.answered() for a in agents),
        "duplicates": sum(c - 1 for a in agents for c in a.parents.values() if c > 1)
        + sum(c - 1 for a in agents for c in a.turns.values() if c > 1),
        "errors": len(errors), "first_error": errors[0] if errors else None,
        "accept_p50": pct(accept_ms, .5), "accept_p99": pct(accept_ms, .99),
        "answer_p50": pct(answer_ms, .5), "answer_p99": pct(answer_ms, .99),
    }


# -- the node (this process) ------------------------------------------------------------------
async def run_agents_child(
    args: argparse.Namespace, url: str, env: dict[str, str]
) -> dict[str, Any]:
    """Start the agents in a child process; their summary (its last stdout line)."""
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--agents-of", url,
        "--agents", str(args.agents), "--sessions", str(args.sessions),
        "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens),
        "--timeout", str(args.timeout),
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"the agents failed ({proc.returncode}): {err.decode()[-2000:]}")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


@dataclass
class CpuClock:
    """CPU seconds of the event loop (main thread), the other threads, and nats-server."""

    loop: float
    threads: float
    server: float

    @classmethod
    def now(cls) -> CpuClock:
        me = psutil.Process()
        main = threading.main_thread().native_id
        loop = threads = 0.0
        for t in me.threads():
            spent = t.user_time + t.system_time
            if t.id == main:
                loop += spent
            else:
                threads += spent
        server = sum(
            c.cpu_times().user + c.cpu_times().system
            for c in me.children(recursive=True) if "nats-server" in c.name()
        )
        return cls(loop, threads, server)

    def __sub__(self, other: CpuClock) -> CpuClock:
        return CpuClock(
            self.loop - other.loop, self.threads - other.threads, self.server - other.server
        )


def report(seen: dict[str, Any], logs: list[MutableMapping[str, Any]], args: argparse.Namespace,
           rss: int, cpu: CpuClock) -> bool:
    done = [e for e in logs if e.get("event") == "chat_done" and e.get("outcome") == "committed"]
    starts = {e["turn"]: e for e in logs if e.get("event") == "chat_start"}
    multi = sum(1 for e in done if starts.get(e["turn"], {}).get("parents", 1) > 1)
    engine_ms = sum(e["total_ms"] for e in done)
    overhead_ms = sum(e["overhead_ms"] for e in done)
    per_turn = [e["overhead_ms"] / e["total_ms"] for e in done if e["total_ms"] > 0]
    sent, answered = seen["sent"], seen["answered"]
    first = seen["first_error"]
    print(f"agents × sessions × prompts   {args.agents} × {args.sessions} × {args.prompts}"
          f"  (max_tokens {args.max_tokens}, {args.slots} slots × {args.threads} threads)")
    print(f"prompts answered / sent       {answered} / {sent} = {answered / max(sent, 1):.3f}")
    print(f"duplicate replies             {seen['duplicates']}")
    print(f"error events                  {seen['errors']}"
          + (f" (first: {first.get('code')}: {first.get('message')})" if first else ""))
    print(f"turns committed               {len(done)} ({multi} answered more than one prompt)")
    print(f"engine time, sum of total_ms  {engine_ms:.1f} ms ({engine_ms / max(len(done), 1):.2f}"
          " ms per turn)")
    print(f"runner + bus, sum of overhead {overhead_ms:.1f} ms "
          f"({overhead_ms / max(len(done), 1):.2f} ms per turn)")
    print(f"node overhead per turn        {overhead_ms / max(engine_ms, 1e-9):.3f} "
          f"(sums); median of per-turn ratios {statistics.median(per_turn) if per_turn else 0:.3f}")
    turns = max(len(done), 1)
    bus_cpu = cpu.loop + cpu.server
    print(f"CPU per turn                  event loop {cpu.loop * 1000 / turns:.2f} ms + "
          f"nats-server {cpu.server * 1000 / turns:.2f} ms; engine threads "
          f"{cpu.threads * 1000 / turns:.2f} ms")
    if cpu.threads < 0.1:  # CPU clocks tick in 10 ms: a short run says nothing
        print("node overhead per turn, CPU   (run too short to measure)")
    else:
        print(f"node overhead per turn, CPU   {bus_cpu / cpu.threads:.3f} "
              "((event loop + nats-server) ÷ engine threads)")
    print(f"publish → accepted            p50 {seen['accept_p50']:.1f} ms, "
          f"p99 {seen['accept_p99']:.1f} ms")
    print(f"publish → commit              p50 {seen['answer_p50']:.1f} ms, "
          f"p99 {seen['answer_p99']:.1f} ms")
    print(f"wall time                     {seen['wall_s']:.2f} s "
          f"({answered / max(seen['wall_s'], 1e-9):.1f} prompts/s)")
    print(f"node RSS                      {rss / (1 << 20):.1f} MiB")
    if not seen["finished"]:
        print(f"timed out after {args.timeout:.0f} s")
    return bool(seen["finished"]) and answered == sent and seen["duplicates"] == 0


async def main(args: argparse.Namespace) -> int:
    from node.app import Node
    from node.config import NodeConfig

    with tempfile.TemporaryDirectory(prefix="infernode-bench-") as tmp:
        config = NodeConfig(
            # The demo model unless told: the node is measured here, not a model.
            data_dir=Path(tmp), model=args.model or Path("demo"), n_slots=args.slots,
            threads=args.threads,
            heartbeat_s=0, max_pending_per_session=max(64, args.prompts),
        )
        with capture_logs() as logs:
            node = Node(config)
            await node.start()
            try:
                before = CpuClock.now()
                seen = await run_agents_child(args, node.url, client_env(Path(tmp), node.url))
                cpu = CpuClock.now() - before
                rss = psutil.Process().memory_info().rss
            finally:
                await node.stop()
        return 0 if report(seen, list(logs), args, rss, cpu) else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="GGUF model (default: demo model)")
    p.add_argument("--agents", type=int, default=32)
    p.add_argument("--sessions", type=int, default=8, help="sessions per agent")
    p.add_argument("--prompts", type=int, default=2, help="prompts per session")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="threads per slot; 0 uses every core (oversubscribed cores stall ggml)")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--agents-of", metavar="URL", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_agents_or_main(parse(), main, agents_main))
