"""Chunked-prefill benchmark: three sessions decode while a fourth prefills a long prompt.

    python bench/prefill_interleave.py [--model PATH] [--prompt-tokens N] [--threads N]
    python bench/prefill_interleave.py --quick      # tiny model, small sizes: checks that it runs

On the llama-cpp engine (one context shared by every slot, one batch across sequences per
step), three sessions decode a long reply; once each has begun, a fourth sends a prompt of
``--prompt-tokens`` tokens. The decoders' inter-token latency while that prompt is prefilled
is measured twice in one run: with the engine's chunking (while other slots are busy, a
chunk sized to take ``STEP_BUDGET_S``) and with every chunk ``n_batch`` tokens, as prefill
ran before it was chunked (one ``n_batch`` chunk per step, the decoders' tokens riding
along). The
ratio is their p99 inter-token latency, chunked ÷ n_batch chunks; the long prompt's own
prefill time is printed for both, the price of the smaller chunks. It exits 0 whatever the
verdict: it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable for ``bench.common``.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.engine import decode as decode_mod  # noqa: E402
from actors.engine.engine import SlotEngine  # noqa: E402
from actors.engine.interface import CancelToken  # noqa: E402
from actors.engine.loader import load_engine  # noqa: E402
from bench.common import (  # noqa: E402
    BenchError,
    Chatter,
    Ratio,
    bench_model,
    median,
    pct,
    print_table,
    quiet_logs,
    spec_of,
    user,
)
from node.config import NodeConfig  # noqa: E402
from node.demo_model import BENCH, TINY, ModelShape  # noqa: E402

DECODERS = 3


@dataclass(frozen=True)
class Sizes:
    """How big: the full run, or ``--quick``."""

    shape: ModelShape
    """Shape of the generated model (unused with ``--model``)."""
    prompt: int
    """Tokens of the long prompt."""
    n_batch: int
    """Prompt tokens per chunk of a prefill alone."""
    threads: int = 0
    """Threads per evaluation unless --threads says (0: every core)."""


FULL = Sizes(dataclasses.replace(BENCH, n_ctx=8192), prompt=6000, n_batch=512)
QUICK = Sizes(TINY, prompt=1500, n_batch=512, threads=1)


@dataclass(frozen=True)
class Run:
    """What one measurement saw."""

    gaps_ms: list[float]
    """The decoders' inter-token gaps that overlap the long prompt's prefill."""
    prefill_ms: float
    """The long prompt's prefill."""
    alone_ms: list[float]
    """The decoders' gaps before the long prompt came."""
    prompt_tokens: int
    """Of the long prompt."""
    steps: int
    """``llama_decode`` calls during the prefill."""


async def measure(engine: SlotEngine, text: str, tag: str) -> Run:
    """Three decoders, then the long prompt ``text``; their gaps during its prefill."""
    chatter = Chatter(5)
    stamps: list[list[float]] = [[] for _ in range(DECODERS)]
    stop = CancelToken()
    decoders = [
        asyncio.ensure_future(engine.run_turn(
            spec_of(f"{tag}-d{i}", [user(chatter.words(8))], max_tokens=1 << 20),
            lambda _t, s=stamps[i]: s.append(time.perf_counter()), stop,
        ))
        for i in range(DECODERS)
    ]
    while min(len(s) for s in stamps) < 20:  # every decoder under way, and its pace seen
        if any(d.done() for d in decoders):
            raise BenchError("a decoder ended before the long prompt came")
        await asyncio.sleep(0.05)
    shared = engine.backend.shared  # type: ignore[attr-defined]
    steps = shared.steps
    begin = time.perf_counter()
    out = await engine.run_turn(
        spec_of(f"{tag}-long", [user(text)], max_tokens=1), lambda _t: None, CancelToken()
    )
    end = begin + out.timings.ttft_ms / 1000
    steps = shared.steps - steps
    stop.cancel("client")
    await asyncio.gather(*decoders)
    gaps, alone = [], []
    for s in stamps:
        for a, b in zip(s, s[1:], strict=False):
            if b >= begin and a <= end:
                gaps.append((b - a) * 1000)
            elif b < begin:
                alone.append((b - a) * 1000)
    return Run(gaps, out.timings.prefill_ms, alone, out.usage.prompt_tokens, steps)


async def run_all(args: argparse.Namespace, sizes: Sizes, model: Path) -> tuple[str, list[Ratio]]:
    """Load the engine; measure with n_batch chunks, then chunked; the ratios."""
    threads = int(args.threads or sizes.threads or os.cpu_count() or 1)
    prompt = args.prompt_tokens or sizes.prompt
    engine = await asyncio.to_thread(load_engine, NodeConfig(
        model=model, engine="llama-cpp", n_slots=DECODERS + 1, n_ctx=prompt + 1024,
        n_batch=sizes.n_batch, threads=threads, gpu_layers=args.gpu_layers,
        bank_ram_bytes=0, verify_restore=False, speculate=args.speculate,
    ))
    budget = decode_mod.STEP_BUDGET_S
    try:
        text = long_text(engine, prompt)
        decode_mod.STEP_BUDGET_S = 1e9  # every chunk n_batch: prefill as it was
        before = await measure(engine, text, "before")
        decode_mod.STEP_BUDGET_S = budget
        after = await measure(engine, text + " again", "after")
    finally:
        decode_mod.STEP_BUDGET_S = budget
        await engine.close()
    header = (f"model {model.name} ({engine.info.model}), engine {engine.info.engine}, "
              f"threads {threads}, speculate {args.speculate}, {DECODERS} decoding sessions, "
              f"one {after.prompt_tokens}-token "
              "prompt, "
              f"n_batch {sizes.n_batch}, step budget while others decode {budget * 1000:.0f} ms")
    return header, ratios(before, after, sizes.n_batch)


def long_text(engine: SlotEngine, tokens: int) -> str:
    """User text of about ``tokens`` tokens: words counted, measured, scaled (thrice)."""
    words = Chatter(11).words(tokens).split()
    n = tokens // 2
    for _ in range(3):
        got = len(engine.backend.tokenizer.encode(" ".join(words[:n]), False))
        n = min(len(words), max(1, n * tokens // max(got, 1)))
    return " ".join(words[:n])


def ratios(before: Run, after: Run, n_batch: int) -> list[Ratio]:
    """p99 inter-token latency and prefill time, chunked ÷ n_batch chunks."""
    def line(run: Run, name: str) -> str:
        return (f"{name}: p50 {median(run.gaps_ms):.0f} ms, p99 {pct(run.gaps_ms, 0.99):.0f} ms "
                f"over {len(run.gaps_ms)} gaps during the prefill (decoding alone: p50 "
                f"{median(run.alone_ms):.0f} ms); prefill {run.prefill_ms:.0f} ms in "
                f"{run.steps} steps")

    p99 = pct(after.gaps_ms, 0.99) / pct(before.gaps_ms, 0.99)
    detail = f"{line(after, 'chunked')}\n{line(before, f'chunks of {n_batch}')}"
    cost = after.prefill_ms / before.prefill_ms
    return [
        Ratio("p99 ITL during a long prefill: chunked / n_batch chunks", p99, 0.5, True, detail),
        Ratio("long prefill time: chunked / n_batch chunks", cost, 1.3, True,
              f"{after.prefill_ms:.0f} ms / {before.prefill_ms:.0f} ms"),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description="Chunked-prefill benchmark: decoders beside a "
                                "long prefill.")
    p.add_argument("--model", type=Path, help="GGUF to measure (default: the bench model)")
    p.add_argument("--prompt-tokens", type=int, default=0, help="tokens of the long prompt")
    p.add_argument("--threads", type=int, default=0, help="threads per evaluation (0: all)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded to CUDA")
    p.add_argument("--speculate", default="auto", choices=("auto", "on", "off"),
                   help="the decoders' n-gram speculation (the node's --speculate)")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; 0 whatever the verdict."""
    args = parse_args(argv)
    quiet_logs()
    sizes = QUICK if args.quick else FULL
    start = time.perf_counter()
    model = args.model or bench_model(sizes.shape, "quick" if args.quick else "bench-8k")
    header, table = asyncio.run(run_all(args, sizes, model))
    title = "infernode chunked-prefill benchmark"
    if args.quick:
        title += " (--quick: sizes too small for the targets to mean anything)"
    print_table(f"{title}\n{header}", table)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
