"""Shared-prefix benchmark: 8 agents with one long system prompt, first turns side by side.

    python bench/shared_prefix.py [--model PATH] [--threads N] [--gpu-layers N] [--llama-lib PATH]
    python bench/shared_prefix.py --quick      # tiny model, small sizes: checks that it runs

Agent 1's first turn computes the ~1,000-token system prompt (and its own question) from
nothing; agents 2–8 then start their own sessions with the same system prompt and restore it
from the bank (another session's snapshot, found by content: the agents are declared one
share group, as an operator declares a mesh with --bank-share-groups). The ratio is the median
first-turn TTFT of agents 2–8 ÷ agent 1's, repeated with a fresh system prompt each round,
on one engine with two slots (the node's default); each turn is banked after it ends, as the
node's bank committer does. It exits 0 whatever the verdict: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable for ``bench.common``.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.engine.engine import SlotEngine  # noqa: E402
from actors.engine.loader import load_engine  # noqa: E402
from bench.common import (  # noqa: E402
    Chatter,
    Ratio,
    bench_model,
    median,
    message_text,
    print_table,
    quiet_logs,
    spread,
    turn,
    user,
)
from node.config import NodeConfig  # noqa: E402
from node.demo_model import BENCH, TINY, ModelShape  # noqa: E402
from schemas.chat import ChatMessage  # noqa: E402

_UNCAPPED = 1 << 40
"""Bank caps: every agent's state must stay banked."""
AGENTS = 8


@dataclass(frozen=True)
class Sizes:
    """How big and how often: the full run, or ``--quick``."""

    shape: ModelShape
    """Shape of the generated model (unused with ``--model``)."""
    n_ctx: int
    """Context length of every slot."""
    system: int
    """Tokens of the shared system prompt."""
    question: int
    """Tokens of each agent's own first message."""
    rounds: int
    """Rounds of 8 agents, each with a fresh system prompt."""
    threads: int = 0
    """Threads per evaluation unless --threads says (0: every core)."""


FULL = Sizes(BENCH, n_ctx=2048, system=1000, question=30, rounds=3)
QUICK = Sizes(TINY, n_ctx=512, system=200, question=10, rounds=1, threads=1)


async def one_round(engine: SlotEngine, chatter: Chatter, sizes: Sizes, r: int) -> list[float]:
    """First-turn TTFT (ms) of each of the 8 agents sharing one fresh system prompt."""
    system = ChatMessage(role="system", content=message_text(engine, chatter, sizes.system))
    ttft: list[float] = []
    for agent in range(AGENTS):
        question = user(message_text(engine, chatter, sizes.question))
        out = await turn(engine, f"r{r}-agent{agent}", [system, question])
        if agent and not out.cache.shared_tokens:
            raise RuntimeError(f"agent {agent + 1} restored no shared prefix: {out.cache}")
        ttft.append(out.timings.ttft_ms)
        # What the node's bank committer does after every committed turn.
        await engine.snapshot(f"r{r}-agent{agent}", out.token_hash, wait_s=60)
    return ttft


async def run_all(args: argparse.Namespace, sizes: Sizes, model: Path) -> tuple[str, Ratio]:
    """Load one engine; run the rounds; the ratio of the medians."""
    threads = int(args.threads or sizes.threads or os.cpu_count() or 1)
    engine = await asyncio.to_thread(load_engine, NodeConfig(
        model=model, n_slots=2, n_ctx=sizes.n_ctx, threads=threads,
        gpu_layers=args.gpu_layers, llama_lib=args.llama_lib,
        bank_ram_bytes=_UNCAPPED, bank_session_bytes=_UNCAPPED,
        bank_share_groups="mesh=*",  # the agents of one mesh share (a declared group)
    ))
    chatter = Chatter(19)
    firsts: list[float] = []
    others: list[float] = []
    try:
        for r in range(sizes.rounds):
            ttft = await one_round(engine, chatter, sizes, r)
            firsts.append(ttft[0])
            others.extend(ttft[1:])
    finally:
        await engine.close()
    header = (f"model {model.name} ({engine.info.model}), engine {engine.info.engine}, "
              f"threads {threads}, {sizes.system}-token system prompt, {AGENTS} agents × "
              f"{sizes.rounds} rounds")
    detail = (f"agents 2–8 median {median(others):.0f} ms ({spread(others, '{:.0f}')}), "
              f"agent 1 median {median(firsts):.0f} ms ({spread(firsts, '{:.0f}')})")
    ratio = Ratio("first-turn TTFT: agents 2–8 / agent 1", median(others) / median(firsts),
                  0.2, True, detail)
    return header, ratio


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description="Shared-prefix benchmark: 8 agents, one prompt.")
    p.add_argument("--model", type=Path, help="GGUF to measure (default: the bench model)")
    p.add_argument("--threads", type=int, default=0, help="threads per evaluation (0: all)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded to CUDA")
    p.add_argument("--llama-lib", type=Path, help="llama library instead of ctransformers'")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; 0 whatever the verdict."""
    args = parse_args(argv)
    quiet_logs()
    sizes = QUICK if args.quick else FULL
    start = time.perf_counter()
    model = args.model or bench_model(sizes.shape, "quick" if args.quick else "bench")
    header, ratio = asyncio.run(run_all(args, sizes, model))
    title = "infernode shared-prefix benchmark"
    if args.quick:
        title += " (--quick: sizes too small for the targets to mean anything)"
    print_table(f"{title}\n{header}", [ratio])
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
