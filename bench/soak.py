"""Soak benchmark: many turns on a few long sessions; turn time and the node's memory stay flat.

    python bench/soak.py                    # 6,000 turns over 20 sessions on 2 slots, demo model
    python bench/soak.py --quick            # 400 turns over 4 sessions (smoke test)
    python bench/soak.py --history-turns 4  # each agent starts a new session every 4 turns

It starts ``infernode up`` as a child process (its own embedded nats-server, the demo
model, ``--ctx`` 512, an 8 MiB RAM bank, 2 slots) and drives it from this process: one agent
per session, each sending its next prompt once the previous one is committed, all agents at
once. By default every session lives the whole run (6,000 turns: 300 turns each, a record
log of 600 messages), and the node's ``truncate`` window keeps its prompt within the
context, so prompt sizes come round again and again: a turn late in the run can be compared
with one early in it at the same prompt size. With ``--history-turns N`` an agent deletes its
session after N turns and goes on in a new one instead. When every turn is answered it
prints, measured in this one run:

- turn time at equal prompt size, last ``--window`` turns ÷ first ``--window`` (target
  <= 1.1: turns do not slow down as the node and its sessions age). Turn time runs from
  publish to the commit event; each turn is binned by its prompt's token count (from its
  ``done`` event), and the two windows are compared over the sizes both hold: each window's
  median per size, weighted by the smaller of the two counts. With every agent waiting on
  its own turn this is mostly queueing behind the other agents, so it also moves with
  whatever else the machine runs; the node's CPU time per turn (node and nats-server, last
  ÷ first window) is printed beside it, and the engine's own buckets below it;
- RSS of the node, sampled every 1% of the turns with the bank's metrics: RSS at the end ÷
  RSS when the RAM bank first reached its cap, i.e. first evicted (target <= 1.1: once the
  bank is full, memory stays flat). A session's runner holds its system messages and its
  window, not its whole history (the record log keeps that); what a turn still adds (the
  line says how much) is mostly each session's bounded de-duplication memory, which
  sessions of 300 turns never fill: ``--history-turns 4`` with a small
  ``--bank-ram-bytes`` shows the node without it;
- turns answered ÷ turns sent (must be 1).
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
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
BANK_RAM_BYTES = 8 << 20
WAITED = {EventKind.ACCEPTED.value, EventKind.DONE.value, EventKind.COMMIT.value,
          EventKind.ERROR.value}
"""The event kinds the agents wait on."""
BUCKETS = ("queue_ms", "lock_wait_ms", "tokenize_ms", "restore_ms", "prefill_ms", "decode_ms",
           "total_ms")
"""The engine's timing buckets, from each turn's ``done`` event."""


@dataclass(frozen=True)
class TurnTime:
    """One answered turn."""

    seconds: float
    """Publish → commit event."""
    prompt_tokens: int
    """The prompt's token count, from its ``done`` event."""
    timings: dict[str, float]
    """The engine's buckets, from its ``done`` event."""


@dataclass(frozen=True)
class Sample:
    """The node, sampled every 1% of the turns."""

    turns: int
    """Turns completed."""
    rss: int
    """RSS of the node process, bytes."""
    server_rss: int
    """RSS of its child processes (the embedded nats-server), bytes."""
    cpu: float
    """CPU seconds of the node and its children."""
    bank_bytes: float
    """Bytes held by the RAM bank."""
    evictions: float
    """Snapshots the RAM bank dropped to make room, so far."""


@dataclass
class Waits:
    """What the agents wait for, keyed as the node's events name them."""

    pending_commit: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    """Idempotency key → the commit future, moved to ``committed`` once accepted."""
    committed: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    """Message id → its turn's commit."""
    id_of: dict[str, str] = field(default_factory=dict)
    """Idempotency key → the prompt's last message id."""
    done_of: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Message id → the ``done`` event of the turn answering it."""
    seen: dict[str, list[str]] = field(default_factory=dict)
    """Session → the events it got (kind and ids), to say what a stuck turn saw."""

    def on_event(self, msg: Msg) -> None:
        """Resolve whatever ``msg`` answers (called for accepted, done, commit and error)."""
        kind = msg.subject.rsplit(".", 1)[-1]
        body = json.loads(msg.data)
        ids = body.get("message_ids") or body.get("parent_ids") or body.get("code")
        self.seen.setdefault(body.get("session", "?"), []).append(f"{kind} {ids}")
        if kind == EventKind.ACCEPTED.value:
            key = body.get("idempotency_key") or ""
            last = body["message_ids"][-1]
            if key in self.pending_commit:
                self.committed[last] = self.pending_commit.pop(key)
                self.id_of[key] = last
        elif kind == EventKind.DONE.value:
            for parent in body["parent_ids"]:
                if parent in self.committed:
                    self.done_of[parent] = body
        elif kind == EventKind.COMMIT.value:
            for parent in body["parent_ids"]:
                fut = self.committed.pop(parent, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
        elif kind == EventKind.ERROR.value:
            fut = self.pending_commit.pop(body.get("idempotency_key") or "", None)
            if fut is not None and not fut.done():
                fut.set_exception(BenchError(f"{body['code']}: {body['message']}"))

    def done_event(self, key: str) -> dict[str, Any]:
        """The ``done`` event of the committed turn that answered the prompt with ``key``."""
        return self.done_of.pop(self.id_of.pop(key, ""), {})


@dataclass
class Soak:
    """The agents and what they measured."""

    nc: Client
    turns: int
    sessions: int
    history_turns: int
    node_pid: int
    bank_cap: int
    waits: Waits = field(default_factory=Waits)
    done: list[TurnTime] = field(default_factory=list)
    """The turns, in the order they completed."""
    samples: list[Sample] = field(default_factory=list)
    started: int = 0
    deleted: int = 0
    _sampling: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Run every agent until ``turns`` turns are committed."""
        # One subscription: nats-py runs each subscription's callbacks on its own task, so a
        # commit could overtake the accepted event before it if they came on two.
        sub = await self.nc.subscribe(S.events("*", "*"), cb=self._on_event)
        await self.nc.flush()
        await self._sample()
        try:
            await asyncio.gather(*(self._agent(i) for i in range(self.sessions)))
        finally:
            await sub.unsubscribe()
        if self._sampling is not None:
            await self._sampling
        await self._sample()

    async def _on_event(self, msg: Msg) -> None:
        if S.event_kind(msg.subject) in WAITED:
            self.waits.on_event(msg)

    async def _agent(self, index: int) -> None:
        rounds = n = 0
        async with InfernodeClient("", nc=self.nc) as client:
            while self.started < self.turns:
                self.started += 1
                session = f"soak-{index}-{rounds}"
                # The same few questions over and over: prompt sizes come round again, so
                # turns early and late in the run can be compared at equal size.
                step = n % (self.history_turns or 10)
                text = f"agent {index} turn {step}: what next?"
                self.done.append(await self._turn(session, text))
                n += 1
                step_every = max(1, self.turns // 100)
                if len(self.done) % step_every == 0 and self._sampling is None:
                    self._sampling = asyncio.get_running_loop().create_task(self._sample())
                if self.history_turns and n % self.history_turns == 0:
                    await client.delete(session)
                    self.deleted += 1
                    rounds += 1

    async def _turn(self, session: str, text: str) -> TurnTime:
        loop = asyncio.get_running_loop()
        key = uuid.uuid4().hex
        committed: asyncio.Future[None] = loop.create_future()
        self.waits.pending_commit[key] = committed
        prompt = PromptRequest(
            messages=(ChatMessage(role="user", content=text),), idempotency_key=key,
            max_tokens=8, sampling=SamplingParams(temperature=0.0),
        )
        began = time.perf_counter()
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
        seconds = time.perf_counter() - began
        done = self.waits.done_event(key)
        self.waits.seen.pop(session, None)
        usage, timings = done.get("usage") or {}, done.get("timings") or {}
        return TurnTime(seconds, int(usage.get("prompt_tokens", -1)),
                        {b: float(timings.get(b, 0.0)) for b in BUCKETS})

    async def _history(self, session: str) -> str:
        async with InfernodeClient("", nc=self.nc) as client:
            try:
                reply = await client.history(session)
            except Exception as e:  # what is known is still printed
                return f"unavailable ({e})"
        return reply.model_dump_json()[:3000]

    async def _sample(self) -> None:
        turns = len(self.done)
        async with InfernodeClient("", nc=self.nc) as client:
            metrics = await client.metrics()
        node = psutil.Process(self.node_pid)
        children = node.children(recursive=True)
        cpu = 0.0
        for proc in (node, *children):
            times = proc.cpu_times()
            cpu += times.user + times.system
        self.samples.append(Sample(
            turns, node.memory_info().rss, sum(c.memory_info().rss for c in children), cpu,
            metrics.value("infernode_bank_bytes", tier="ram"),
            metrics.total("infernode_bank_evictions_total"),
        ))
        self._sampling = None


async def start_node(
    data_dir: Path, args: argparse.Namespace
) -> tuple[asyncio.subprocess.Process, str]:
    """``infernode up`` in a child process; it and its URL once it is ready.

    ``args.node_log``: the node logs at info (its ``chat_done`` lines) into this file."""
    log = args.node_log
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node.cli", "up", "--data-dir", str(data_dir),
        "--bank-ram-bytes", str(args.bank_ram_bytes), "--slots", "2",
        "--ctx", str(args.ctx), "--heartbeat-s", "0",
        "--log-level", "info" if log else "warning", "--log-format", "console",
        "--threads", "1", "--nats-port", "0", "--model", "demo", env=env,
        cwd=Path(__file__).resolve().parents[1],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    said: list[str] = []
    try:
        async with asyncio.timeout(120):
            while line := (await proc.stdout.readline()).decode(errors="replace"):
                said.append(line.rstrip())
                if match := READY.search(line):
                    asyncio.get_running_loop().create_task(_drain(proc, log))
                    return proc, match.group(1)
    except TimeoutError:
        pass
    if proc.returncode is None:
        proc.kill()
    await proc.wait()
    raise BenchError("the node did not print its ready line: " + " | ".join(said[-5:]))


async def _drain(proc: asyncio.subprocess.Process, log: Path | None) -> None:
    assert proc.stdout is not None
    with open(log or os.devnull, "wb") as out:
        while line := await proc.stdout.readline():
            out.write(line)


async def stop_node(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then wait (SIGKILL after 60 s)."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def cpu_per_turn(samples: list[Sample], start: int, end: int) -> float:
    """CPU seconds the node and its nats-server spent per turn between two turn counts."""
    low = max((s for s in samples if s.turns <= start), key=lambda s: s.turns)
    high = min((s for s in samples if s.turns >= end), key=lambda s: s.turns)
    return (high.cpu - low.cpu) / max(1, high.turns - low.turns)


def by_size(turns: list[TurnTime]) -> dict[int, list[float]]:
    """Turn times in seconds, by prompt token count."""
    bins: dict[int, list[float]] = defaultdict(list)
    for t in turns:
        bins[t.prompt_tokens].append(t.seconds)
    return bins


def equal_size(first: list[TurnTime], last: list[TurnTime]) -> tuple[float, float, str]:
    """Turn time of both windows over the prompt sizes both hold: each window's bin medians,
    weighted by the smaller count of each bin (seconds), and how many turns that covers."""
    a, b = by_size(first), by_size(last)
    common = sorted(set(a) & set(b) - {-1})
    weights = {n: min(len(a[n]), len(b[n])) for n in common}
    total = sum(weights.values()) or 1
    mean_a = sum(weights[n] * statistics.median(a[n]) for n in common) / total
    mean_b = sum(weights[n] * statistics.median(b[n]) for n in common) / total
    covered = sum(len(a[n]) for n in common), sum(len(b[n]) for n in common)
    bins = " ".join(f"{n}:{statistics.median(a[n]) * 1000:.0f}→{statistics.median(b[n]) * 1000:.0f}"
                    for n in common[:8])
    detail = (f"{len(common)} prompt sizes in both windows, covering {covered[0]} of "
              f"{len(first)} first and {covered[1]} of {len(last)} last turns; "
              f"by size (tokens: first→last ms): {bins}")
    return mean_a, mean_b, detail


def buckets(turns: list[TurnTime]) -> str:
    """The engine's median buckets over ``turns``."""
    return " ".join(
        f"{b.removesuffix('_ms')} {statistics.median(t.timings[b] for t in turns):.1f}"
        for b in BUCKETS
    )


def by_tenth(turns: list[TurnTime]) -> str:
    """Median turn time of each tenth of the run, ms."""
    tenth = max(1, len(turns) // 10)
    return " ".join(f"{statistics.median(t.seconds for t in turns[i:i + tenth]) * 1000:.0f}"
                    for i in range(0, tenth * 10, tenth))


def turn_ratios(soak: Soak, window: int) -> list[Ratio]:
    """Turn time at equal prompt size and node CPU per turn, last window ÷ first."""
    n = len(soak.done)
    first, last = soak.done[:window], soak.done[-window:]
    mean_first, mean_last, detail = equal_size(first, last)
    cpu_first = cpu_per_turn(soak.samples, 0, window)
    cpu_last = cpu_per_turn(soak.samples, n - window, n)
    return [
        Ratio(
            "turn time at equal prompt size: last / first",
            mean_last / mean_first if mean_first else None, 1.1, True,
            f"first {window} turns {mean_first * 1000:.1f} ms, last {window} "
            f"{mean_last * 1000:.1f} ms (publish → commit); {detail}\n"
            f"by tenth of the run (all sizes): {by_tenth(soak.done)} ms\n"
            f"engine medians, ms, first: {buckets(first)}\n"
            f"engine medians, ms, last:  {buckets(last)}",
        ),
        Ratio(
            "node CPU per turn: last / first", cpu_last / cpu_first, 1.1,
            True, f"first {window} turns {cpu_first * 1000:.1f} ms, last {window} "
            f"{cpu_last * 1000:.1f} ms of CPU per "
            "turn (node and its nats-server: what the node's own work costs, whatever else "
            "runs on the machine)",
        ),
    ]


def memory_ratio(soak: Soak) -> Ratio:
    """RSS of the node at the end ÷ when the RAM bank first reached its cap (first evicted)."""
    mib = 1 << 20
    full = next((s for s in soak.samples if s.evictions > 0), None)
    end = soak.samples[-1]
    if full is None:
        return Ratio("RSS: at the end / when the bank reached its cap", None, 1.1, True,
                     f"the bank never evicted: it held {end.bank_bytes / mib:.1f} MiB of "
                     f"{soak.bank_cap / mib:.1f} MiB at the end")
    after = [s for s in soak.samples if s.turns >= full.turns]
    return Ratio(
        "RSS: at the end / when the bank reached its cap", end.rss / full.rss, 1.1, True,
        f"node RSS at {full.turns} turns (bank {full.bank_bytes / mib:.1f} of "
        f"{soak.bank_cap / mib:.1f} MiB, first evictions) {full.rss / mib:.1f} MiB, largest "
        f"after {max(s.rss for s in after) / mib:.1f} MiB, at the end {end.rss / mib:.1f} MiB "
        f"({len(after)} samples, {end.evictions:.0f} evictions; "
        f"{(end.rss - full.rss) / max(1, end.turns - full.turns) / 1024:.1f} KiB a turn after "
        f"it); its nats-server "
        f"{full.server_rss / mib:.1f} → {end.server_rss / mib:.1f} MiB",
    )


def ratios(soak: Soak, window: int) -> list[Ratio]:
    """The result table of a finished run."""
    return [
        *turn_ratios(soak, window),
        memory_ratio(soak),
        Ratio(
            "turns answered / sent", len(soak.done) / soak.turns, 1.0, False,
            f"{len(soak.done)} of {soak.turns} turns on {soak.sessions} agents, "
            f"{soak.deleted} sessions deleted and restarted",
        ),
    ]


async def main(argv: list[str] | None = None) -> int:
    """Run the soak and print its table; exit 0 once it ran (the verdicts are printed)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--turns", type=int, default=6_000)
    p.add_argument("--sessions", type=int, default=20, help="agents, one session each")
    p.add_argument("--history-turns", type=int, default=0,
                   help="turns before an agent starts a new session (0: never)")
    p.add_argument("--window", type=int, default=500,
                   help="turns at each end of the run compared (at most a tenth of them)")
    p.add_argument("--ctx", type=int, default=512, help="context of each slot, tokens")
    p.add_argument("--bank-ram-bytes", type=int, default=BANK_RAM_BYTES, help="the RAM bank cap")
    p.add_argument("--node-log", type=Path, help="write the node's info log (chat_done) here")
    p.add_argument("--quick", action="store_true",
                   help="400 turns over 4 sessions, a 2 MiB bank (smoke test)")
    args = p.parse_args(argv)
    if args.quick:  # long enough per session for its window to move and its sizes to recur
        args.turns, args.sessions, args.bank_ram_bytes = 400, 4, 2 << 20
    window = max(1, min(args.window, args.turns // 10))
    with tempfile.TemporaryDirectory(prefix="infernode-soak-") as tmp:
        proc, url = await start_node(Path(tmp) / "node", args)
        nc = await connect_client(url, "soak", Path(tmp) / "node")
        soak = Soak(nc, args.turns, args.sessions, args.history_turns, proc.pid,
                    args.bank_ram_bytes)
        began = time.perf_counter()
        try:
            await soak.run()
        finally:
            await nc.drain()
            await stop_node(proc)
    took = time.perf_counter() - began
    history = (f"a new session every {args.history_turns} turns" if args.history_turns
               else f"sessions live the whole run, --ctx {args.ctx} window")
    print_table(
        f"soak: {args.turns} turns over {args.sessions} sessions on 2 slots, {history}, "
        f"{took:.0f} s ({len(soak.done) / took:.0f} turns/s)",
        ratios(soak, window),
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
