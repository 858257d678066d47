"""Where a warm same-session turn's time goes: infernode's llama-cpp engine against
llama-cpp-python's server on the same prompt, in one run.

    python bench/warm_turn.py [--model PATH|smollm2] [--threads N] [--reps 5]
    python bench/warm_turn.py --quick      # tiny model: checks that it runs

One session holds a ~1,900-token history; then it takes a turn of ~130 new tokens right
after its previous one (the back-to-back case of issue 19). The same conversation goes to
``llama_cpp.server --cache true`` (its prompt cache holds the previous turn). Printed: the
client-side TTFT of both and their ratio (target <= 1.0), and the node's own breakdown of
its TTFT from the turn's ``done`` event — queue, lock wait, tokenize, restore, prefill —
with the rest (bus, runner and thread hand-offs) as what the client saw beyond the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.anchor import Words, user  # noqa: E402
from bench.anchor_sides import (  # noqa: E402
    HttpSide,
    NodeSide,
    Setup,
    llama_cpp_python_side,
    node_side,
)
from bench.common import Ratio, bench_model, median, print_table, quiet_logs  # noqa: E402
from node.demo_model import BENCH, TINY  # noqa: E402
from node.models import resolve_model  # noqa: E402

PARTS = ("queue_ms", "lock_wait_ms", "tokenize_ms", "restore_ms", "prefill_ms")


async def warm_turns(side: HttpSide | NodeSide, words: Words, history: int, new: int,
                     reps: int, tag: str) -> tuple[list[float], list[dict[str, float]]]:
    """Per rep: a session with ``history`` tokens, then two back-to-back turns of ``new``
    tokens; the second one's client TTFT and (on the node) its ``done`` timings."""
    ttft: list[float] = []
    parts: list[dict[str, float]] = []
    system = {"role": "system", "content": "You are a careful assistant."}
    for rep in range(reps):
        session = f"{tag}-{rep}"
        await side.chat(session, [system, user(words.text(history))], 8)
        await side.chat(session, [user(words.text(new))], 8)
        out = await side.chat(session, [user(words.text(new))], 8)
        ttft.append(out.ttft_ms)
        if isinstance(side, NodeSide) and side.last and side.last.done:
            done = side.last.done
            got = {p: getattr(done.timings, p) for p in PARTS}
            got["engine_ttft_ms"] = done.timings.ttft_ms
            got["new_tokens"] = done.usage.new_prefill_tokens
            got["cached_tokens"] = done.usage.cached_tokens
            parts.append(got)
    return ttft, parts


async def measure(setup: Setup, history: int, new: int, reps: int) -> list[Ratio]:
    """Both systems up; the node first, then the server, ``reps`` sessions each."""
    words = Words(setup.model, 9)
    async with contextlib.AsyncExitStack() as stack:
        ours = await stack.enter_async_context(node_side("infernode", "llama-cpp", setup))
        theirs = await stack.enter_async_context(llama_cpp_python_side(setup))
        if isinstance(ours, str):
            raise SystemExit(ours)
        await ours.chat("warm-up", [user("Hello.")], 2)
        our_ttft, parts = await warm_turns(ours, words, history, new, reps, "ours")
        their_ttft: list[float] = []
        if not isinstance(theirs, str):
            await theirs.chat("warm-up", [user("Hello.")], 2)
            words = Words(setup.model, 9)  # the same text again
            their_ttft, _ = await warm_turns(theirs, words, history, new, reps, "theirs")
    engine = {k: median([p[k] for p in parts]) for k in parts[0]}
    client = median(our_ttft)
    lines = [f"{k} {v:.1f}" for k, v in engine.items()]
    beyond = client - engine["engine_ttft_ms"] - engine["queue_ms"]
    detail = (f"ours {client:.0f} ms, llama_cpp.server "
              f"{median(their_ttft) if their_ttft else float('nan'):.0f} ms (medians of {reps})"
              f"\nnode done timings (medians): {', '.join(lines)}"
              f"\nclient TTFT beyond the engine's ttft and queue: {beyond:.1f} ms")
    return [Ratio("warm same-session TTFT: ours / llama_cpp.server",
                  client / median(their_ttft) if their_ttft else None, 1.0, True, detail)]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description="Warm same-session turn: where the time goes")
    p.add_argument("--model", default=None, help="GGUF or installed model name")
    p.add_argument("--threads", type=int, default=0, help="threads per evaluation (0: all)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--bank-ram-bytes", type=int, default=4 << 30,
                   help="the node's RAM bank; 0: no snapshots (what they cost a warm turn)")
    p.add_argument("--quick", action="store_true", help="tiny model: a smoke run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print; 0 whatever the verdict."""
    args = parse_args(argv)
    quiet_logs()
    if args.model:
        model = resolve_model(Path(args.model)) or Path(args.model)
    else:
        model = bench_model(TINY, "tiny") if args.quick else bench_model(BENCH, "bench")
    history, new, n_ctx = (120, 20, 512) if args.quick else (1900, 130, 4096)
    threads = args.threads or os.cpu_count() or 1
    setup = Setup(model, threads, n_ctx, 2, bank_ram_bytes=args.bank_ram_bytes)
    reps = 2 if args.quick else args.reps
    ratios = asyncio.run(measure(setup, history, new, reps))
    title = f"warm turn: model {model.name}, {threads} threads, {history}+{new} tokens"
    print_table(title, ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
