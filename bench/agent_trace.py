"""Agent-trace benchmark: many sessions growing turn by turn on few slots, through a whole node.

    python bench/agent_trace.py               # 8 sessions x 8 turns on the bench model
    python bench/agent_trace.py --quick       # tiny model, 4 sessions x 3 turns

It drives a whole in-process Node (embedded nats-server, admission, runners, engine, bank
committer) through the client library, as agents would. Every turn appends ~200 tokens of
tool output and generates 48 tokens; sessions take turns round-robin on 2 slots, so every
turn after a session's first has to come back from the bank. Per turn it prints prompt,
cached and new tokens, TTFT and the miss reason, then:

- prefix-hit ratio: cached ÷ prompt tokens over every turn (and over warm turns only);
- warm TTFT ÷ delta-only prefill time: what a warm turn costs beyond evaluating its new
  tokens (restore, tokenize, first sample); 1.0 is the floor;
- warm TTFT ÷ cold TTFT: after each round, session 0's whole conversation is sent to a new
  session (computed from scratch, then deleted) and its TTFT set beside session 0's warm one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import bench_model  # noqa: E402
from node.app import Node  # noqa: E402
from node.client import InfernodeClient, TurnResult  # noqa: E402
from node.config import NodeConfig  # noqa: E402
from node.demo_model import BENCH, TINY  # noqa: E402
from schemas.chat import ChatMessage, SamplingParams  # noqa: E402
from schemas.messages import DoneEvent  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
WORDS = (  # noqa: SIM905
    "the of and to in is that it for on with as was at by be this are from or have one you "
    "not but what all were when we there can your said each she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two "
    "more write go see number no way could people my than first water been call who its now "
    "find long down day did get come made may part hello world node agent session prompt "
    "token cache bank turn reply tool user assistant system"
).split()


@dataclass(frozen=True)
class Plan:
    """Sizes of one run."""

    sessions: int
    turns: int
    tool_tokens: int
    max_tokens: int
    n_ctx: int


@dataclass
class Row:
    """One turn as the done event reported it."""

    session: int
    turn: int
    done: DoneEvent

    @property
    def reusable(self) -> int:
        """Tokens this turn leaves in its slot (prompt + completion)."""
        u = self.done.usage
        return u.prompt_tokens + u.completion_tokens


class ToolOutputs:
    """Tool results of about ``tokens`` tokens each, counted with the node's own tokenizer."""

    def __init__(self, count: Callable[[str], int], tokens: int, seed: int = 7) -> None:
        self.count = count
        self.tokens = tokens
        self.rng = random.Random(seed)

    def next(self, session: int, turn: int) -> str:
        """The output of the tool call of ``session``'s turn ``turn``."""
        text = f"$ run step {turn} of agent {session}\n"
        while self.count(text) < self.tokens:
            text += " ".join(self.rng.choice(WORDS) for _ in range(8)) + "\n"
        return text


async def send(client: InfernodeClient, session: str, messages: list[ChatMessage],
               max_tokens: int) -> tuple[TurnResult, str]:
    result = TurnResult()
    async for _ in client.prompt(session, messages, sampling=GREEDY, max_tokens=max_tokens,
                                 timeout=900, result=result):
        pass
    assert result.done is not None, "the turn ended without a done event"
    return result, result.done.text


async def trace(
    client: InfernodeClient, plan: Plan, tools: ToolOutputs
) -> tuple[list[Row], list[tuple[float, float]]]:
    """Run the trace; returns every turn, and (warm, cold) TTFT pairs of session 0."""
    convo: dict[int, list[ChatMessage]] = {s: [] for s in range(plan.sessions)}
    rows: list[Row] = []
    pairs: list[tuple[float, float]] = []
    print(f"{'sess':>4} {'turn':>4} {'prompt':>6} {'cached':>6} {'new':>5} {'ttft_ms':>8} "
          f"{'prefill_ms':>10} {'restore_ms':>10}  source  miss")
    for t in range(plan.turns):
        for s in range(plan.sessions):
            if t == 0:
                new = [ChatMessage(role="system", content="You are a coding agent with tools."),
                       ChatMessage(role="user", content=tools.next(s, t))]
            else:
                # Tool output the agent passes on as its next message (a `tool` message must
                # answer a call the model made, and these turns make none).
                new = [ChatMessage(role="user", content=tools.next(s, t))]
            result, text = await send(client, f"agent-{s}", new, plan.max_tokens)
            convo[s] += [*new, ChatMessage(role="assistant", content=text)]
            row = Row(s, t, result.done)  # type: ignore[arg-type]
            rows.append(row)
            d = row.done
            print(f"{s:>4} {t:>4} {d.usage.prompt_tokens:>6} {d.usage.cached_tokens:>6} "
                  f"{d.usage.new_prefill_tokens:>5} {d.timings.ttft_ms:>8.1f} "
                  f"{d.timings.prefill_ms:>10.1f} {d.cache.restore_ms:>10.1f}  "
                  f"{d.cache.source:<6}  {d.cache.miss_reason or '-'}", flush=True)
        if t > 0:
            warm = next(r for r in rows if r.session == 0 and r.turn == t)
            cold_prompt = convo[0][:-1]  # the same messages turn t of session 0 was asked
            cold, _ = await send(client, f"cold-{t}", cold_prompt, 1)
            assert cold.done is not None
            pairs.append((warm.done.timings.ttft_ms, cold.done.timings.ttft_ms))
            print(f"     cold recompute of agent-0 turn {t}: prompt "
                  f"{cold.done.usage.prompt_tokens}, ttft {cold.done.timings.ttft_ms:.1f} ms",
                  flush=True)
            await client.delete(f"cold-{t}")
    return rows, pairs


def report(rows: list[Row], pairs: list[tuple[float, float]]) -> None:
    """The overall ratios, with the numbers behind them."""
    prompt = sum(r.done.usage.prompt_tokens for r in rows)
    cached = sum(r.done.usage.cached_tokens for r in rows)
    warm = [r for r in rows if r.turn > 0]
    previous = {(r.session, r.turn): r for r in rows}
    reusable = sum(previous[(r.session, r.turn - 1)].reusable for r in warm)
    warm_cached = sum(r.done.usage.cached_tokens for r in warm)
    warm_prompt = sum(r.done.usage.prompt_tokens for r in warm)
    ttft_over_prefill = [r.done.timings.ttft_ms / r.done.timings.prefill_ms
                         for r in warm if r.done.timings.prefill_ms > 0]
    print()
    print(f"prefix-hit ratio, all turns:    {cached / prompt:.3f}  ({cached} of {prompt} tokens)")
    print(f"prefix-hit ratio, warm turns:   {warm_cached / warm_prompt:.3f}  "
          f"({warm_cached} of {warm_prompt} tokens)")
    print(f"warm reuse of reusable prefix:  {warm_cached / reusable:.3f}  "
          f"({warm_cached} of {reusable} tokens the previous turns left)")
    sources = {s: sum(r.done.cache.source == s for r in warm) for s in ("slot", "bank", "none")}
    print(f"warm turn sources:              {sources}")
    med = statistics.median
    print(f"warm TTFT / delta-only prefill: {med(ttft_over_prefill):.2f}  (median per turn; "
          f"warm TTFT median {med(r.done.timings.ttft_ms for r in warm):.1f} ms, delta prefill "
          f"median {med(r.done.timings.prefill_ms for r in warm):.1f} ms, restore median "
          f"{med(r.done.cache.restore_ms for r in warm):.1f} ms)")
    if pairs:
        ratios = [w / c for w, c in pairs]
        print(f"warm TTFT / cold TTFT:          {med(ratios):.3f}  (median of {len(pairs)} rounds; "
              f"per round: {', '.join(f'{x:.2f}' for x in ratios)})")
        print(f"                                last round: warm {pairs[-1][0]:.1f} ms vs cold "
              f"{pairs[-1][1]:.1f} ms")


async def main(args: argparse.Namespace) -> int:
    plan = (Plan(4, 3, 60, 16, 1024) if args.quick else
            Plan(args.sessions, args.turns, args.tool_tokens, 48, 4096))
    model = args.model or bench_model(TINY if args.quick else BENCH,
                                     "tiny" if args.quick else "bench")
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    with tempfile.TemporaryDirectory(prefix="infernode-trace-") as tmp:
        config = NodeConfig(data_dir=Path(tmp), model=model, n_slots=2, n_ctx=plan.n_ctx,
                            threads=args.threads)
        print(f"agent trace: {plan.sessions} sessions x {plan.turns} turns, ~{plan.tool_tokens} "
              f"tool tokens + {plan.max_tokens} generated per turn, 2 slots, "
              f"{args.threads} thread(s), model {model.name}; driving a whole Node", flush=True)
        started = time.perf_counter()
        async with Node(config) as n, InfernodeClient(n.url, config=config) as client:
            assert n.engine is not None
            tokenizer = n.engine.backend.tokenizer
            tools = ToolOutputs(lambda text: len(tokenizer.encode(text, False)), plan.tool_tokens)
            rows, pairs = await trace(client, plan, tools)
            metrics = await client.metrics()
        report(rows, pairs)
        restore_p50 = metrics.quantile("infernode_bank_restore_seconds", 0.5) or 0.0
        restore_p90 = metrics.quantile("infernode_bank_restore_seconds", 0.9) or 0.0
        evictions = (metrics.value("infernode_slot_evictions_total")
                     + metrics.value("infernode_bank_evictions_total"))
        print(f"bank: {metrics.total('infernode_bank_restores_total'):.0f} restores, "
              f"{evictions:.0f} evictions, "
              f"{metrics.value('infernode_bank_snapshots_stored_total'):.0f} commits stored, "
              f"{metrics.total('infernode_bank_snapshots_dropped_total'):.0f} dropped; "
              f"restore p50 ~{restore_p50 * 1000:.1f} ms, p90 ~{restore_p90 * 1000:.1f} ms "
              "(from histogram buckets)")
        print(f"wall time {time.perf_counter() - started:.0f} s")
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 4 sessions x 3 turns")
    p.add_argument("--model", type=Path, help="GGUF model (default: the bench model)")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--tool-tokens", type=int, default=200, help="tool-output tokens per turn")
    # One thread per evaluation by default: on a small shared machine llama.cpp's spinning
    # worker threads slow each other down badly when cores are contended.
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
