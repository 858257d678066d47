"""Load benchmark: sustained durable admission under many agents, and nothing lost.

    python bench/load.py                      # 30 s, 16 agents x 4 sessions x 6, demo model
    python bench/load.py --duration 60 --agents 32 --window 8 --model PATH.gguf

It starts an embedded node (its own nats-server with JetStream) in this process and the
agents in a child process, so their work does not share the node's event loop. For
``--duration`` seconds every agent keeps up to ``--window`` prompts in flight on each of its
sessions: it publishes through JetStream, and sends the next one as soon as one is
answered. A prompt refused with ``busy`` (429, the session's queue is full) is sent again
once the session answers something, as an agent should. Then publishing stops and the run
waits until every prompt is answered. Measured in this one run:

- prompts admitted durably per second: ``accepted`` events (the prompt is in the session's
  record log, and only then acked on the intake stream) during the publishing window,
  divided by its length;
- admission latency, publish → ``accepted``, p50 and p99; and publish → commit;
- prompts answered ÷ prompts sent (must be 1.000) and duplicate answers (must be 0): a
  prompt named as a parent by more than one commit, or a turn committed twice;
- busy refusals (each one sent again), other error events (must be 0), the most prompts
  any session had waiting (at most ``--max-pending``), and the node's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from nats.aio.client import Client  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402

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
class Agent(EventTally):
    """One agent: a connection, its sessions, a window of prompts in flight on each."""

    def __init__(self, name: str, sessions: list[str], args: argparse.Namespace) -> None:
        super().__init__()
        self.name = name
        self.sessions = sessions
        self.args = args
        self.nc: Client | None = None
        self.wanted = 0
        """Prompts the agent wanted answered; a resend after busy is the same prompt."""
        self.sent_at: dict[str, float] = {}
        """Idempotency key → when its publish started."""
        self.busy: set[str] = set()
        self.owed: Counter[str] = Counter()
        """Session → busy prompts not sent again yet."""
        self.changed = asyncio.Condition()

    async def on_event(self, msg: Msg) -> None:
        session, kind = S.event_of(msg.subject)
        body = json.loads(msg.data)
        self.tally(kind, body, self.sent_at)
        if kind == "error" and body.get("code") == "busy":
            self.busy.add(body.get("idempotency_key"))
            self.owed[session] += 1
        elif kind == "error":
            self.errors.append(body)
        async with self.changed:
            self.changed.notify_all()

    def answered(self, key: str) -> bool:
        ids = self.ids.get(key)
        return ids is not None and all(self.parents[i] for i in ids)

    def settled(self, key: str) -> bool:
        return self.answered(key) or key in self.busy

    def finished(self) -> bool:
        if sum(self.owed.values()) or len(self.ids) + len(self.errors) < self.wanted:
            return False
        return all(self.answered(k) for k in self.ids)

    async def run(self, url: str, until: float) -> None:
        """Subscribe to its sessions' events, then keep each session's window full."""
        self.nc = await connect_client(url, f"load-{self.name}")
        for session in self.sessions:
            await self.nc.subscribe(S.events_all(session), cb=self.on_event)
        await self.nc.flush()
        await asyncio.gather(*(self._session(s, until) for s in self.sessions))

    async def _session(self, session: str, until: float) -> None:
        window: list[str] = []
        while True:
            window = [k for k in window if not self.settled(k)]
            past = time.perf_counter() >= until
            if past and not self.owed[session] and not window:
                return
            # After the window closes, keep waiting on prompts in flight: a busy refusal may
            # still come for one of them, and it must be sent again.
            if window and (len(window) >= self.args.window or self.owed[session] or past):
                await self._wait_any(list(window), until)
                continue
            if self.owed[session]:
                self.owed[session] -= 1
            else:
                self.wanted += 1
            window.append(await self._publish(session))

    async def _wait_any(self, keys: list[str], until: float) -> None:
        timeout = max(until - time.perf_counter(), 0.0) + self.args.timeout
        async with self.changed:
            await asyncio.wait_for(
                self.changed.wait_for(lambda: any(self.settled(k) for k in keys)), timeout
            )

    async def _publish(self, session: str) -> str:
        assert self.nc is not None
        key = uuid.uuid4().hex
        prompt = PromptRequest(
            messages=(ChatMessage(role="user", content=f"{self.name} asks {session}"),),
            sampling=SamplingParams(temperature=0.0), max_tokens=self.args.max_tokens,
            idempotency_key=key,
        )
        self.sent_at[key] = time.perf_counter()
        await self.nc.jetstream().publish(
            S.prompt(session), prompt.model_dump_json().encode(), headers={MSG_ID_HEADER: key}
        )
        return key

    async def wait_finished(self, timeout: float) -> bool:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(self.finished), timeout)
            except TimeoutError:
                return False
        return True



async def agents_main(args: argparse.Namespace) -> dict[str, Any]:
    """Run every agent against ``args.url``; a summary of what they saw."""
    agents = [
        Agent(f"agent{a}", [f"load{a}-s{s}" for s in range(args.sessions)], args)
        for a in range(args.agents)
    ]
    start = time.perf_counter()
    until = start + args.duration
    await asyncio.gather(*(a.run(args.url, until) for a in agents))
    finished = all(await asyncio.gather(*(a.wait_finished(args.timeout) for a in agents)))
    wall = time.perf_counter() - start
    for a in agents:
        if a.nc is not None:
            await a.nc.drain()
    accept_ms = [(a.accepted_at[k] - a.sent_at[k]) * 1000 for a in agents for k in a.accepted_at]
    answer_ms = [
        (a.answered_at[i] - a.sent_at[k]) * 1000
        for a in agents for k, ids in a.ids.items() for i in ids if i in a.answered_at
    ]
    in_window = sum(1 for a in agents for t in a.accepted_at.values() if t <= until)
    errors = [e for a in agents for e in a.errors]
    return {
        "finished": finished, "wall_s": wall, "window_s": args.duration,
        "sent": sum(a.wanted for a in agents),
        "published": sum(len(a.sent_at) for a in agents),
        "accepted": sum(len(a.accepted_at) for a in agents), "accepted_in_window": in_window,
        "answered": sum(1 for a in agents for k in a.ids if a.answered(k)),
        "duplicates": sum(c - 1 for a in agents for c in a.parents.values() if c > 1)
        + sum(c - 1 for a in agents for c in a.turns.values() if c > 1),
        "busy": sum(len(a.busy) for a in agents),
        "errors": len(errors), "first_error": errors[0] if errors else None,
        "accept_p50": pct(accept_ms, 0.5), "accept_p99": pct(accept_ms, 0.99),
        "answer_p50": pct(answer_ms, 0.5), "answer_p99": pct(answer_ms, 0.99),
    }


# -- the node (this process) ------------------------------------------------------------------
async def run_agents_child(
    args: argparse.Namespace, url: str, env: dict[str, str]
) -> dict[str, Any]:
    """Start the agents in a child process; their summary (its last stdout line)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--agents-of", url]
    for flag in ("agents", "sessions", "window", "max_tokens", "duration", "timeout"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"the agents failed ({proc.returncode}): {err.decode()[-2000:]}")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


class PendingWatch:
    """The most prompts any session had waiting, sampled at every ``accepted`` event."""

    def __init__(self, node: Any) -> None:
        from actors.session.host import RunnerHost

        self.host = next(a for a in node.actors if isinstance(a, RunnerHost))
        self.most = 0

    async def on_accepted(self, _msg: Msg) -> None:
        for runner in self.host.runners.values():
            self.most = max(self.most, len(runner.state.pending))


def report(seen: dict[str, Any], args: argparse.Namespace, rss: int, most_pending: int) -> bool:
    """Print the results; True when every prompt was answered exactly once without errors."""
    sent, answered = seen["sent"], seen["answered"]
    ratio = answered / max(sent, 1)
    rate = seen["accepted_in_window"] / max(seen["window_s"], 1e-9)
    first = seen["first_error"]
    print(f"agents × sessions × window      {args.agents} × {args.sessions} × {args.window}"
          f"  (max_tokens {args.max_tokens}, {args.slots} slots × {args.threads} threads, "
          f"max_pending {args.max_pending})")
    print(f"publishing window               {seen['window_s']:.1f} s; all answered after "
          f"{seen['wall_s']:.1f} s")
    print(f"prompts admitted durably / s    {rate:.1f} "
          f"({seen['accepted_in_window']} accepted in the window)")
    print(f"publish → accepted              p50 {seen['accept_p50']:.1f} ms, "
          f"p99 {seen['accept_p99']:.1f} ms")
    print(f"publish → commit                p50 {seen['answer_p50']:.1f} ms, "
          f"p99 {seen['answer_p99']:.1f} ms")
    print(f"prompts answered / sent         {answered} / {sent} = {ratio:.3f}")
    print(f"duplicate answers               {seen['duplicates']}")
    print(f"busy refusals (sent again)      {seen['busy']} "
          f"({seen['published']} publishes in all)")
    print(f"most prompts waiting, 1 session {most_pending} (cap {args.max_pending})")
    print(f"other error events              {seen['errors']}"
          + (f" (first: {first.get('code')}: {first.get('message')})" if first else ""))
    print(f"node RSS                        {rss / (1 << 20):.1f} MiB")
    if not seen["finished"]:
        print(f"not every prompt was answered within {args.timeout:.0f} s after the window")
    ok = bool(seen["finished"]) and answered == sent and seen["duplicates"] == 0
    return ok and seen["errors"] == 0 and most_pending <= args.max_pending


async def main(args: argparse.Namespace) -> int:
    from structlog.testing import capture_logs

    from node.app import Node
    from node.config import NodeConfig

    with tempfile.TemporaryDirectory(prefix="infernode-load-") as tmp:
        config = NodeConfig(
            # The demo model unless told: the node is measured here, not a model.
            data_dir=Path(tmp), model=args.model or Path("demo"), n_slots=args.slots,
            threads=args.threads,
            n_ctx=args.ctx, heartbeat_s=0, max_pending_per_session=args.max_pending,
        )
        with capture_logs():  # the node's own log lines would drown the table
            node = Node(config)
            await node.start()
            try:
                watch = PendingWatch(node)
                nc = await connect_client(node.url, "load-watch", Path(tmp))
                await nc.subscribe(S.events("*", "accepted"), cb=watch.on_accepted)
                seen = await run_agents_child(args, node.url, client_env(Path(tmp), node.url))
                await nc.drain()
                rss = psutil.Process().memory_info().rss
            finally:
                await node.stop()
        return 0 if report(seen, args, rss, watch.most) else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="GGUF model (default: demo model)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of publishing")
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--sessions", type=int, default=4, help="sessions per agent")
    p.add_argument("--window", type=int, default=6, help="prompts in flight per session")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--max-pending", type=int, default=3,
                   help="the node's max_pending_per_session (below --window: busy is exercised)")
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per slot")
    p.add_argument("--ctx", type=int, default=4096,
                   help="context per slot; a session's history grows for the whole run")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the last answers after the window")
    p.add_argument("--agents-of", metavar="URL", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_agents_or_main(parse(), main, agents_main))
