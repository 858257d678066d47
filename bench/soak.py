"""Soak benchmark: many turns on many sessions; the node's memory and turn time must stay flat.

    python bench/soak.py                    # 10,000 turns over 200 sessions, demo model
    python bench/soak.py --quick            # 400 turns over 20 sessions (smoke test)
    python bench/soak.py --history-turns 0  # histories never reset: they grow turn by turn

It starts ``infernode up`` as a child process (its own embedded nats-server, the demo
model, an 8 MiB bank, 2 slots) and drives it from this process: one agent per session, each
sending its next prompt once the previous one is committed, all agents at once. Each agent
keeps its history to a fixed length, as an agent on a bounded context does: after
``--history-turns`` turns it deletes its session and continues in a new one. When every
turn is answered it prints, measured in this one run:

- RSS of the node after warm-up: the largest sample after the first 10% of turns ÷ the
  sample at the end of them (target <= 1.10: memory stays flat);
- turn time, publish → commit event: median of the last 10% of turns ÷ median of the
  first 10% (target <= 1.2: turns do not slow down as the node ages); with every agent
  waiting on its own turn this is queueing time, so it also moves with whatever else the
  machine runs, and the node's CPU time per turn, last 10% ÷ first 10%, is printed beside it;
- turns answered ÷ turns sent (must be 1).

With ``--history-turns 0`` the same run shows how turn time grows with the history itself
(each turn's prompt holds every turn before it): that ratio is expected to exceed its target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from nats.aio.client import Client  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402

from bench.common import BenchError, Ratio, connect_client, print_table  # noqa: E402
from node.client import InfernodeClient  # noqa: E402
from schemas.chat import ChatMessage, SamplingParams  # noqa: E402
from schemas.messages import PromptRequest  # noqa: E402
from schemas.subjects import MSG_ID_HEADER, EventKind, Subjects  # noqa: E402

S = Subjects()
READY = re.compile(r"infernode: ready on (nats://\S+)")
TURN_TIMEOUT_S = 120.0
WAITED = {EventKind.ACCEPTED.value, EventKind.COMMIT.value, EventKind.ERROR.value}
"""The event kinds the agents wait on."""


@dataclass
class Waits:
    """What the agents wait for, keyed as the node's events name them."""

    accepted: dict[str, asyncio.Future[str]] = field(default_factory=dict)
    """Idempotency key → the prompt's last message id."""
    committed: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    """Message id → its turn's commit."""
    pending_commit: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    """Idempotency key → the commit future, moved to ``committed`` once accepted."""
    seen: dict[str, list[str]] = field(default_factory=dict)
    """Session → the events it got (kind and ids), to say what a stuck turn saw."""

    def on_event(self, msg: Msg) -> None:
        """Resolve whatever ``msg`` answers (called for accepted, commit and error)."""
        kind = msg.subject.rsplit(".", 1)[-1]
        body = json.loads(msg.data)
        ids = body.get("message_ids") or body.get("parent_ids") or body.get("code")
        self.seen.setdefault(body.get("session", "?"), []).append(f"{kind} {ids}")
        if kind == EventKind.ACCEPTED.value:
            key = body.get("idempotency_key") or ""
            last = body["message_ids"][-1]
            if key in self.pending_commit:
                self.committed[last] = self.pending_commit.pop(key)
            if key in self.accepted:
                self.accepted.pop(key).set_result(last)
        elif kind == EventKind.COMMIT.value:
            for parent in body["parent_ids"]:
                fut = self.committed.pop(parent, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
        elif kind == EventKind.ERROR.value:
            fut = self.pending_commit.pop(body.get("idempotency_key") or "", None)
            if fut is not None and not fut.done():
                fut.set_exception(BenchError(f"{body['code']}: {body['message']}"))


@dataclass
class Soak:
    """The agents and what they measured."""

    nc: Client
    turns: int
    sessions: int
    history_turns: int
    node_pid: int
    waits: Waits = field(default_factory=Waits)
    done: list[float] = field(default_factory=list)
    """Turn times in seconds, in the order the turns completed."""
    rss: list[tuple[int, int]] = field(default_factory=list)
    """(turns completed, node RSS bytes), sampled every 1% of the turns."""
    cpu: list[tuple[int, float]] = field(default_factory=list)
    """(turns completed, CPU seconds of the node and its nats-server), sampled alike."""
    started: int = 0
    deleted: int = 0

    async def run(self) -> None:
        """Run every agent until ``turns`` turns are committed."""
        # One subscription: nats-py runs each subscription's callbacks on its own task, so a
        # commit could overtake the accepted event before it if they came on two.
        sub = await self.nc.subscribe(S.events("*", "*"), cb=self._on_event)
        await self.nc.flush()
        self._sample()
        try:
            await asyncio.gather(*(self._agent(i) for i in range(self.sessions)))
        finally:
            await sub.unsubscribe()

    async def _on_event(self, msg: Msg) -> None:
        if S.event_kind(msg.subject) in WAITED:
            self.waits.on_event(msg)

    async def _agent(self, index: int) -> None:
        rounds = n = 0
        async with InfernodeClient("", nc=self.nc) as client:
            while self.started < self.turns:
                self.started += 1
                session = f"soak-{index}-{rounds}"
                began = time.perf_counter()
                await self._turn(session, f"agent {index} turn {n}: what comes next?")
                self.done.append(time.perf_counter() - began)
                n += 1
                if len(self.done) % max(1, self.turns // 100) == 0:
                    self._sample()
                if self.history_turns and n % self.history_turns == 0:
                    await client.delete(session)
                    self.deleted += 1
                    rounds += 1

    async def _turn(self, session: str, text: str) -> None:
        loop = asyncio.get_running_loop()
        key = uuid.uuid4().hex
        committed: asyncio.Future[None] = loop.create_future()
        self.waits.pending_commit[key] = committed
        prompt = PromptRequest(
            messages=(ChatMessage(role="user", content=text),), idempotency_key=key,
            max_tokens=8, sampling=SamplingParams(temperature=0.0),
        )
        await self.nc.jetstream().publish(
            S.prompt(session), prompt.model_dump_json().encode(), headers={MSG_ID_HEADER: key}
        )
        try:
            await asyncio.wait_for(committed, TURN_TIMEOUT_S)
        except TimeoutError:
            raise BenchError(
                f"{session}: no commit within {TURN_TIMEOUT_S:.0f} s for key {key}; its events: "
                f"{self.waits.seen.get(session)}; its history: {await self._history(session)}"
            ) from None

    async def _history(self, session: str) -> str:
        async with InfernodeClient("", nc=self.nc) as client:
            try:
                reply = await client.history(session)
            except Exception as e:  # what is known is still printed
                return f"unavailable ({e})"
        return reply.model_dump_json()[:3000]

    def _sample(self) -> None:
        node = psutil.Process(self.node_pid)
        self.rss.append((len(self.done), node.memory_info().rss))
        cpu = 0.0
        for proc in (node, *node.children(recursive=True)):
            times = proc.cpu_times()
            cpu += times.user + times.system
        self.cpu.append((len(self.done), cpu))


async def start_node(data_dir: Path) -> tuple[asyncio.subprocess.Process, str]:
    """``infernode up`` in a child process; it and its URL once it is ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node.cli", "up", "--data-dir", str(data_dir),
        "--bank-ram-bytes", str(8 << 20), "--heartbeat-s", "0", "--log-level", "warning",
        "--log-format", "console",
        "--threads", "1", "--nats-port", "0", "--model", "demo", env=env, cwd=Path(__file__).resolve().parents[1],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    said: list[str] = []
    try:
        async with asyncio.timeout(120):
            while line := (await proc.stdout.readline()).decode(errors="replace"):
                said.append(line.rstrip())
                if match := READY.search(line):
                    asyncio.get_running_loop().create_task(_drain(proc))
                    return proc, match.group(1)
    except TimeoutError:
        pass
    if proc.returncode is None:
        proc.kill()
    await proc.wait()
    raise BenchError("the node did not print its ready line: " + " | ".join(said[-5:]))


async def _drain(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while await proc.stdout.readline():
        pass


async def stop_node(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then wait (SIGKILL after 60 s)."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def cpu_per_turn(soak: Soak, start: int, end: int) -> float:
    """CPU seconds the node and its nats-server spent per turn between two turn counts."""
    at = dict(soak.cpu)
    low = max((n for n in at if n <= start), default=0)
    high = min((n for n in at if n >= end), default=max(at))
    return (at[high] - at[low]) / max(1, high - low)


def ratios(soak: Soak) -> list[Ratio]:
    """The result table of a finished run."""
    tenth = max(1, len(soak.done) // 10)
    first, last = soak.done[:tenth], soak.done[-tenth:]
    cpu_first = cpu_per_turn(soak, 0, tenth)
    cpu_last = cpu_per_turn(soak, len(soak.done) - tenth, len(soak.done))
    warm = next((rss for n, rss in soak.rss if n >= tenth), soak.rss[-1][1])
    after = [rss for n, rss in soak.rss if n >= tenth] or [warm]
    mib = 1 << 20
    return [
        Ratio(
            "RSS: largest after warm-up / at warm-up", max(after) / warm, 1.10, True,
            f"at warm-up ({tenth} turns) {warm / mib:.1f} MiB, largest after "
            f"{max(after) / mib:.1f} MiB, at the end {after[-1] / mib:.1f} MiB "
            f"({len(after)} samples)",
        ),
        Ratio(
            "turn time: last 10% / first 10%",
            statistics.median(last) / statistics.median(first), 1.2, True,
            f"median first {statistics.median(first) * 1000:.1f} ms, last "
            f"{statistics.median(last) * 1000:.1f} ms over {tenth} turns each; by tenth: "
            + " ".join(f"{statistics.median(soak.done[i:i + tenth]) * 1000:.0f}"
                       for i in range(0, tenth * 10, tenth)) + " ms",
        ),
        Ratio(
            "node CPU per turn: last 10% / first 10%", cpu_last / cpu_first, 1.2, True,
            f"first {cpu_first * 1000:.1f} ms, last {cpu_last * 1000:.1f} ms of CPU per turn "
            "(node and its nats-server: what the node's own work costs, whatever else runs "
            "on the machine)",
        ),
        Ratio(
            "turns answered / sent", len(soak.done) / soak.turns, 1.0, False,
            f"{len(soak.done)} of {soak.turns} turns on {soak.sessions} agents, "
            f"{soak.deleted} sessions deleted and restarted",
        ),
    ]


async def main(argv: list[str] | None = None) -> int:
    """Run the soak and print its table; exit 0 once it ran (the verdicts are printed)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--turns", type=int, default=10_000)
    p.add_argument("--sessions", type=int, default=200, help="agents, one session each")
    p.add_argument("--history-turns", type=int, default=4,
                   help="turns before an agent starts a new session (0: never)")
    p.add_argument("--quick", action="store_true", help="400 turns over 20 sessions")
    args = p.parse_args(argv)
    if args.quick:
        args.turns, args.sessions = 400, 20
    with tempfile.TemporaryDirectory(prefix="infernode-soak-") as tmp:
        proc, url = await start_node(Path(tmp) / "node")
        nc = await connect_client(url, "soak", Path(tmp) / "node")
        soak = Soak(nc, args.turns, args.sessions, args.history_turns, proc.pid)
        began = time.perf_counter()
        try:
            await soak.run()
        finally:
            await nc.drain()
            await stop_node(proc)
    took = time.perf_counter() - began
    history = f"{args.history_turns} turns" if args.history_turns else "growing"
    print_table(
        f"soak: {args.turns} turns over {args.sessions} sessions, history {history}, "
        f"{took:.0f} s ({len(soak.done) / took:.0f} turns/s)",
        ratios(soak),
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
