"""Cluster benchmark: how soon a killed node's sessions answer on another node, and what the
move costs next to recomputing them.

    python bench/cluster.py                   # demo model, 2 s leases, 6 sessions, 600 words
    python bench/cluster.py --quick           # smoke run: 2 sessions, short histories
    python bench/cluster.py --model PATH.gguf --lease-ttl-s 5
    python bench/cluster.py --prompts 1000    # admissions: more append-only prompts
    python bench/cluster.py --admissions 2000 # more appends per node count

It starts a nats-server and two ``infernode up`` processes on it, A then B (B stands by
with ``--no-balance``: A takes every partition), with the bank in the object store. Each
session gets a first turn with a long user message on A; once every snapshot is in the
object store, A is SIGKILLed and each session's next prompt is published at once.
Measured in this one run:

- failover: time from the SIGKILL to each moved session's first token on B, divided by the
  lease TTL (B can take A's partitions only once their leases expire: 0.67-1 TTL after the
  kill, A renewing every third of a TTL; B watches the leases and takes them then);
- restore ÷ recompute: the moved turns' time to first token on B (their KV restored from
  the object store) divided by the same conversations' time to first token on a node with
  no bank (recomputed from their text), a third node on its own nats-server;
- admissions through a 3-server NATS cluster with replicas 3 ÷ through one nats-server, one
  node each, append-only prompts (bench/cluster_admissions.py).
- durable admissions per second with 1, 2 and 3 nodes: on another nats-server, one node,
  then a second and a third joining (each stage measured once the nodes hold their fair
  shares of the partitions); each stage publishes prompts that append without a turn
  (``reply: false``) over many sessions as fast as it can and counts them once every one
  is in the record log (its ``accepted`` event). Every process shares this machine's
  cores, so more nodes add no CPU here: the ratios say what the partitioning costs or
  gains on one machine, not what more machines give.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nats
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.balance import fair_shares  # noqa: E402
from actors.lease_bucket import read_owners  # noqa: E402
from bench.cluster_admissions import measure as measure_cluster_admissions  # noqa: E402
from bench.common import Chatter, Ratio, median, print_table, quiet_logs  # noqa: E402
from node.demo_model import write_llama_gguf  # noqa: E402
from node.nats_server import EmbeddedNats  # noqa: E402
from schemas.chat import ChatMessage, SamplingParams  # noqa: E402
from schemas.messages import PromptRequest  # noqa: E402
from schemas.subjects import Subjects  # noqa: E402

S = Subjects()
GREEDY = SamplingParams(temperature=0.0)
READY = re.compile(r'"event": "up_ready"')


class NodeChild:
    """``infernode up`` as a child process whose output a thread reads (it never blocks)."""

    def __init__(self, url: str, data: Path, model: Path, *flags: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
        env["INFERNODE_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "up", "--nats-url", url, "--data-dir", str(data),
             "--model", str(model), "--log-format", "json", *flags],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.ready = threading.Event()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if READY.search(line):
                self.ready.set()

    async def wait_ready(self, timeout: float = 180) -> None:
        if not await asyncio.to_thread(self.ready.wait, timeout):
            raise RuntimeError(f"node did not start: {''.join(self.lines[-20:])}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Watch:
    """First-token times and ``done`` events of every session, as they arrive."""

    def __init__(self) -> None:
        self.first_token: dict[str, float] = {}
        self.done: dict[str, list[dict[str, Any]]] = {}
        self.changed = asyncio.Event()

    async def on_event(self, msg: Msg) -> None:
        session, kind = S.event_of(msg.subject)
        if kind == "token":
            self.first_token.setdefault(session, time.perf_counter())
        elif kind == "done":
            self.done.setdefault(session, []).append(json.loads(msg.data))
            self.changed.set()

    async def until(self, pred: Any, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not pred():
            self.changed.clear()
            left = deadline - time.perf_counter()
            if left <= 0:
                raise RuntimeError("the sessions were not all answered in time")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                continue


def prompt(*messages: ChatMessage, max_tokens: int = 8) -> bytes:
    return PromptRequest(messages=messages, sampling=GREEDY, max_tokens=max_tokens)\
        .model_dump_json().encode()


async def first_turns(
    nc: Any, sessions: list[str], texts: list[str]
) -> Watch:
    """Each session's first turn; the watch that saw them."""
    watch = Watch()
    await nc.subscribe(S.events("*", "*"), cb=watch.on_event)
    await nc.flush()
    for session, text in zip(sessions, texts, strict=True):
        await nc.jetstream().publish(S.prompt(session), prompt(ChatMessage(role="user",
                                                                          content=text)))
    await watch.until(lambda: all(s in watch.done for s in sessions), timeout=600)
    return watch


async def measure_move(args: argparse.Namespace, tmp: Path, model: Path, texts: list[str],
                       sessions: list[str]) -> tuple[list[float], list[float], list[str],
                                                      list[ChatMessage]]:
    """Kill-to-first-token and TTFT of the moved turns, their cache sources, and answers."""
    # A slot per session: each first turn is banked as it commits, none at an eviction. B
    # stands by (no balance), so every session is on A when A is killed.
    flags = ("--lease-ttl-s", str(args.lease_ttl_s), "--bank-object-store", "--ctx", "4096",
             "--slots", str(len(sessions)), "--no-balance")
    async with EmbeddedNats(tmp / "nats") as server:
        a = NodeChild(server.url, tmp / "a", model, *flags)
        await a.wait_ready()
        b = NodeChild(server.url, tmp / "b", model, *flags)
        try:
            await b.wait_ready()
            banked = asyncio.Event()
            metas: list[Msg] = []

            async def on_meta(msg: Msg) -> None:
                metas.append(msg)
                if len(metas) >= 2 * len(sessions):  # each snapshot: its bytes, then its meta
                    banked.set()

            nc = await nats.connect(server.url)
            await nc.subscribe(f"$O.{S.bank_bucket}.M.>", cb=on_meta)
            watch = await first_turns(nc, sessions, texts)
            await asyncio.wait_for(banked.wait(), 120)
            answers = [ChatMessage(role="assistant", content="".join(
                d["text"] for d in watch.done[s][:1])) for s in sessions]
            watch.first_token.clear()
            killed = time.perf_counter()
            a.kill()
            for session in sessions:
                await nc.jetstream().publish(S.prompt(session), prompt(
                    ChatMessage(role="user", content="and what comes next?")))
            await watch.until(lambda: all(len(watch.done.get(s, [])) >= 2 for s in sessions),
                              timeout=600)
            moved = [watch.first_token[s] - killed for s in sessions]
            ttft = [watch.done[s][-1]["timings"]["ttft_ms"] for s in sessions]
            sources = [watch.done[s][-1]["cache"]["source"] for s in sessions]
            await nc.close()
            return moved, ttft, sources, answers
        finally:
            b.stop()
            if a.proc.poll() is None:
                a.stop()


async def measure_recompute(tmp: Path, model: Path, texts: list[str], sessions: list[str],
                            answers: list[ChatMessage]) -> list[float]:
    """TTFT of the same conversations on a node with no bank (recomputed from the text)."""
    async with EmbeddedNats(tmp / "nats-cold") as server:
        c = NodeChild(server.url, tmp / "c", model, "--bank-ram-bytes", "0", "--ctx", "4096")
        try:
            await c.wait_ready()
            nc = await nats.connect(server.url)
            watch = Watch()
            await nc.subscribe(S.events("*", "done"), cb=watch.on_event)
            await nc.flush()
            for session, text, answer in zip(sessions, texts, answers, strict=True):
                await nc.jetstream().publish(S.prompt(session), prompt(
                    ChatMessage(role="user", content=text), answer,
                    ChatMessage(role="user", content="and what comes next?")))
            await watch.until(lambda: all(s in watch.done for s in sessions), timeout=600)
            await nc.close()
            return [watch.done[s][0]["timings"]["ttft_ms"] for s in sessions]
        finally:
            c.stop()


async def balanced(nc: Any, nodes: int, timeout: float = 120) -> None:
    """Wait until ``nodes`` nodes hold their fair shares of the 16 partitions."""
    kv = await nc.jetstream().key_value(S.lease_bucket)
    want = sorted(fair_shares([str(i) for i in range(nodes)], 16).values())
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        owners = await read_owners(kv, S)
        if len(owners) == 16 and sorted(Counter(owners.values()).values()) == want:
            return
        await asyncio.sleep(0.2)  # a benchmark polls; the tests wait on the lease watch
    raise RuntimeError(f"{nodes} nodes did not balance within {timeout:g} s")


async def admissions(nc: Any, stage: str, sessions: int, prompts: int) -> float:
    """Durable admissions per second: ``prompts`` appends over ``sessions`` sessions."""
    accepted = asyncio.Event()
    count = {"n": 0}

    async def on_accepted(msg: Msg) -> None:
        if not S.event_of(msg.subject)[0].startswith(f"{stage}-"):
            return
        count["n"] += 1
        if count["n"] >= prompts:
            accepted.set()

    sub = await nc.subscribe(S.events("*", "accepted"), cb=on_accepted)
    await nc.flush()
    body = [PromptRequest(messages=(ChatMessage(role="user", content=f"note {i}"),),
                          reply=False).model_dump_json().encode() for i in range(prompts)]
    js = nc.jetstream()
    start = time.perf_counter()
    await asyncio.gather(*(js.publish(S.prompt(f"{stage}-{i % sessions}"), b)
                           for i, b in enumerate(body)))
    await asyncio.wait_for(accepted.wait(), 600)
    elapsed = time.perf_counter() - start
    await sub.unsubscribe()
    return prompts / elapsed


async def measure_admissions(tmp: Path, model: Path, sessions: int, prompts: int
                             ) -> list[float]:
    """Durable admissions per second with 1, then 2, then 3 nodes on one nats-server."""
    rates = []
    children: list[NodeChild] = []
    async with EmbeddedNats(tmp / "nats-admit") as server:
        nc = await nats.connect(server.url)
        try:
            for n in (1, 2, 3):
                child = NodeChild(server.url, tmp / f"admit-{n}", model, "--lease-ttl-s", "2")
                children.append(child)
                await child.wait_ready()
                await balanced(nc, n)
                rates.append(await admissions(nc, f"admit{n}", sessions, prompts))
        finally:
            await nc.close()
            for child in reversed(children):
                child.stop()
    return rates


async def main(args: argparse.Namespace) -> int:
    quiet_logs()
    n, words = (2, 200) if args.quick else (args.sessions, args.words)
    chatter = Chatter(7)
    texts = [chatter.words(words) for _ in range(n)]
    sessions = [f"moved-{i}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or write_llama_gguf(tmp / "demo.gguf")
        moved, restored, sources, answers = await measure_move(args, tmp, model, texts,
                                                               sessions)
        recomputed = await measure_recompute(tmp, model, texts, sessions, answers)
        cluster_admissions = await measure_cluster_admissions(
            NodeChild, tmp, model, 60 if args.quick else args.prompts)
        prompts = 60 if args.quick else args.admissions
        rates = await measure_admissions(tmp, model, 12 if args.quick else 48, prompts)
    ttl = args.lease_ttl_s
    title = (f"cluster: 2 nodes (1, 2, 3 for admission), {n} sessions of ~{words} words, "
             f"lease TTL {ttl:g} s")
    print_table(title, [
        Ratio("failover: kill -> first token / lease TTL", median(moved) / ttl, 1.1, True,
              f"kill -> first token median {median(moved):.2f} s, max {max(moved):.2f} s"),
        Ratio("moved turn TTFT: restored / recomputed",
              median(restored) / median(recomputed), 0.1, True,
              f"restored {median(restored):.1f} ms (cache {', '.join(sorted(set(sources)))}), "
              f"recomputed {median(recomputed):.1f} ms (medians)"),
        cluster_admissions,
        # No target to beat on one machine (every node shares its cores): the bar is only
        # that partitioning over more nodes does not collapse admission.
        Ratio("durable admissions/s: 2 nodes / 1 node", rates[1] / rates[0], 0.5, False,
              f"{prompts} appends each: 1 node {rates[0]:.0f}/s, 2 nodes {rates[1]:.0f}/s"),
        Ratio("durable admissions/s: 3 nodes / 1 node", rates[2] / rates[0], 0.5, False,
              f"3 nodes {rates[2]:.0f}/s; {os.cpu_count()} CPU cores shared by every node"),
    ])
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="GGUF model (default: demo model)")
    p.add_argument("--sessions", type=int, default=6)
    p.add_argument("--words", type=int, default=600, help="words in each first message")
    p.add_argument("--lease-ttl-s", type=float, default=2.0)
    p.add_argument("--prompts", type=int, default=400,
                   help="append-only prompts of the admissions measurement")
    p.add_argument("--admissions", type=int, default=600,
                   help="prompts appended at each node count")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 short sessions")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
