"""The two engines side by side, and what batching the decode steps of sessions buys.

    python bench/engines_compare.py [--model PATH] [--threads N] [--gpu-layers N]
    python bench/engines_compare.py --quick      # tiny model, small sizes: checks that it runs

1. prefill tok/s of llama-cpp ÷ ctransformers: a fresh session's prompt of the same ids on
   both, from the engine's own ``prefill_ms``; runs alternate between engines, medians;
2. decode tok/s of llama-cpp ÷ ctransformers: the greedy tokens after that prompt, from the
   engine's ``decode_ms``, same runs;
3. llama-cpp, aggregate decode tok/s of 4 sessions at once ÷ one session alone on the same
   4-slot engine: the 4 sessions' steps share each ``llama_decode`` (tokens over wall time);
4. the same for ctransformers, for comparison: 4 contexts side by side, each on its share of
   the threads (as the node runs them);
5. those 4 sessions' aggregate decode tok/s, llama-cpp ÷ ctransformers;
6. ctransformers, one session's turn time with the cores shared among the busy slots (the
   default: a slot alone gets them all) ÷ with each of 2 slots fixed to its half;
7-9. a real model (``--real-model``, default ``smollm2`` when installed): first-turn and
   warm-turn TTFT and decode tok/s through the node ÷ raw llama-cpp-python, per engine that
   loads it (see ``bench/real_model.py``).

Both engines load in this process, with the same threads and context length. Without
``--model`` it writes the random-weight bench model (``node.demo_model.BENCH``) once and
reuses it. It exits 0 whatever the verdicts: it is a benchmark, not a test.
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

from actors.engine.backends.llamacpp.backend import INSTALL_HINT, llama_cpp_available  # noqa: E402
from actors.engine.engine import SlotEngine  # noqa: E402
from actors.engine.interface import TurnOutcome  # noqa: E402
from actors.engine.loader import load_engine  # noqa: E402
from bench import real_model  # noqa: E402
from bench.common import (  # noqa: E402
    BenchError,
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
from node.models import ModelNameError, resolve_model  # noqa: E402

ENGINES = ("ctransformers", "llama-cpp")
CONCURRENT = 4


@dataclass(frozen=True)
class Sizes:
    """How big and how often: the full run, or ``--quick``."""

    shape: ModelShape
    """Shape of the generated model (unused with ``--model``)."""
    n_ctx: int
    """Context length of every slot."""
    prompt: int
    """Tokens of the prompt whose prefill is timed."""
    decode: int
    """Tokens generated per timed turn."""
    reps: int
    """Timed turns per engine and measurement."""
    threads: int = 0
    """Threads per evaluation unless --threads says (0: every core)."""


FULL = Sizes(BENCH, n_ctx=1024, prompt=512, decode=64, reps=7)
QUICK = Sizes(TINY, n_ctx=256, prompt=64, decode=16, reps=2, threads=1)
REAL_FULL = {"paragraphs": 8, "decode": 48, "reps": 5}
REAL_QUICK = {"paragraphs": 1, "decode": 8, "reps": 1}


def load(name: str, model: Path, sizes: Sizes, threads: int, gpu: int, slots: int) -> SlotEngine:
    """An engine without snapshots: evictions cost nothing inside the timed turns."""
    return load_engine(NodeConfig(
        model=model, engine=name, n_slots=slots, n_ctx=sizes.n_ctx, threads=threads,
        gpu_layers=gpu, bank_ram_bytes=0, verify_restore=False,
    ))


def _full(out: TurnOutcome, want: int) -> TurnOutcome:
    if out.usage.completion_tokens != want:
        raise BenchError(
            f"a timed turn stopped after {out.usage.completion_tokens} of {want} tokens "
            f"({out.finish_reason}); use a model that does not end its replies early"
        )
    return out


# -- 1, 2: prefill and decode -----------------------------------------------------------------
async def single_session_ratios(
    engines: dict[str, SlotEngine], sizes: Sizes, chatter: Chatter
) -> list[Ratio]:
    """Ratios 1 and 2 from the same turns: prefill and decode tok/s, alternating engines."""
    prefill: dict[str, list[float]] = {e: [] for e in engines}
    decode: dict[str, list[float]] = {e: [] for e in engines}
    same_ids = True
    base = next(iter(engines.values()))
    for rep in range(sizes.reps):
        text = message_text(base, chatter, sizes.prompt)
        ids: list[tuple[int, ...] | None] = []
        for name, engine in engines.items():
            out = _full(await turn(engine, f"one-{rep}", [user(text)], sizes.decode), sizes.decode)
            prefill[name].append(out.usage.new_prefill_tokens / (out.timings.prefill_ms / 1000))
            decode[name].append(out.usage.completion_tokens / (out.timings.decode_ms / 1000))
            ids.append(out.completion_ids)
        same_ids = same_ids and len(set(ids)) == 1
    return [
        _engine_ratio("prefill tok/s, llama-cpp ÷ ctransformers", prefill, sizes.prompt, "prompt"),
        _engine_ratio(
            "decode tok/s, llama-cpp ÷ ctransformers", decode, sizes.decode, "generated",
            f"\ngreedy ids equal on both engines in every run: {'yes' if same_ids else 'no'}",
        ),
    ]


def _engine_ratio(
    name: str, rates: dict[str, list[float]], n: int, what: str, extra: str = ""
) -> Ratio:
    ct, lc = (median(rates[e]) for e in ENGINES)
    detail = "\n".join(
        f"{e}: {median(rates[e]):.0f} tok/s (runs {spread(rates[e], '{:.0f}')}), {n} {what} tokens"
        for e in ENGINES
    )
    return Ratio(name, lc / ct, 1.0, at_most=False, detail=detail + extra)


# -- 3, 4: sessions at once -------------------------------------------------------------------
async def aggregate_rate(engine: SlotEngine, sessions: int, sizes: Sizes, tag: str) -> float:
    """Completion tokens of ``sessions`` concurrent turns over their wall time."""
    prompts = [f"session {i} of {tag} asks the agent about water and time" for i in range(sessions)]
    start = time.perf_counter()
    outs = await asyncio.gather(*(
        turn(engine, f"{tag}-{i}", [user(p)], sizes.decode) for i, p in enumerate(prompts)
    ))
    wall = time.perf_counter() - start
    return sum(_full(o, sizes.decode).usage.completion_tokens for o in outs) / wall


async def concurrency_ratio(
    name: str, engine: SlotEngine, sizes: Sizes, threads: int, how: str
) -> tuple[Ratio, float]:
    """Aggregate decode tok/s of 4 sessions at once ÷ one session alone, same engine; and
    the aggregate tok/s of the 4."""
    rates: dict[int, list[float]] = {1: [], CONCURRENT: []}
    calls: dict[int, list[tuple[int, int, float]]] = {1: [], CONCURRENT: []}
    for rep in range(sizes.reps):
        for n in (1, CONCURRENT):
            before = _steps(engine)
            start = time.perf_counter()
            rates[n].append(await aggregate_rate(engine, n, sizes, f"{n}x{rep}"))
            wall = time.perf_counter() - start
            after = _steps(engine)
            if before is not None and after is not None:
                calls[n].append((after[0] - before[0], after[1] - before[1], wall))
    a, t = median(rates[1]), median(rates[CONCURRENT])
    detail = (
        f"one session: {a:.0f} tok/s (runs {spread(rates[1], '{:.0f}')}); "
        f"{CONCURRENT} at once: {t:.0f} tok/s in all (runs {spread(rates[CONCURRENT], '{:.0f}')})"
        f"\n{how}; {threads} threads per evaluation, {sizes.decode} tokens per session"
    )
    for n, runs in calls.items():
        if runs:
            steps = sum(r[0] for r in runs)
            evals = sum(r[1] for r in runs)
            ms = 1000 * sum(r[2] for r in runs) / max(steps, 1)
            detail += (
                f"\n{n} session(s): {evals / max(steps, 1):.2f} evaluations per llama_decode "
                f"call, {ms:.1f} ms of wall time per call"
            )
    ratio = Ratio(
        f"{name}: {CONCURRENT} sessions' decode tok/s ÷ one alone", t / a, 2.0, at_most=False,
        detail=detail,
    )
    return ratio, t


def _steps(engine: SlotEngine) -> tuple[int, int] | None:
    shared = getattr(engine.backend, "shared", None)
    return None if shared is None else (shared.steps, shared.evaluations)


# -- 6: ctransformers' threads for one session ---------------------------------------------
async def thread_share_ratio(model: Path, sizes: Sizes, gpu: int) -> Ratio:
    """One session's turn time on 2 slots: cores shared by busy slots ÷ a fixed half each."""
    cores = os.cpu_count() or 1
    fixed = max(1, cores // 2)
    engines = {
        how: await asyncio.to_thread(load, "ctransformers", model, sizes, threads, gpu, 2)
        for how, threads in (("shared", 0), ("fixed", fixed))
    }
    ms: dict[str, list[float]] = {how: [] for how in engines}
    chatter = Chatter(5)
    try:
        for rep in range(sizes.reps):
            text = message_text(engines["shared"], chatter, sizes.prompt)
            for how, engine in engines.items():
                out = await turn(engine, f"alone-{rep}", [user(text)], sizes.decode)
                ms[how].append(_full(out, sizes.decode).timings.total_ms)
    finally:
        for engine in engines.values():
            await engine.close()
    detail = (
        f"cores shared (default): {median(ms['shared']):.0f} ms (runs "
        f"{spread(ms['shared'], '{:.0f}')}); fixed {fixed} of {cores} threads per slot: "
        f"{median(ms['fixed']):.0f} ms (runs {spread(ms['fixed'], '{:.0f}')}); "
        f"{sizes.prompt} prompt + {sizes.decode} generated tokens"
    )
    return Ratio("ctransformers: one session's turn ms, shared cores ÷ fixed half",
                 median(ms["shared"]) / median(ms["fixed"]), 1.0, at_most=True, detail=detail)


# -- 7-9: a real model, through the node and raw ----------------------------------------------
def real_model_path(args: argparse.Namespace, quick_model: Path) -> tuple[Path, str] | None:
    """The real model to measure and its label; the quick model under --quick; None when the
    named one is not installed (a line says so)."""
    if args.quick:
        return quick_model, "the tiny random-weight model (--quick)"
    try:
        path = resolve_model(Path(args.real_model))
    except ModelNameError as e:
        print(f"real model skipped: {e}", file=sys.stderr)
        return None
    return (path, args.real_model) if path is not None else None


# -- the run ----------------------------------------------------------------------------------
async def run_all(args: argparse.Namespace, sizes: Sizes, model: Path) -> tuple[str, list[Ratio]]:
    """Load both engines, measure 1 and 2 alternating, then 3 and 4 one engine at a time."""
    threads = int(args.threads or sizes.threads or os.cpu_count() or 1)
    chatter = Chatter(11)
    engines = {
        e: await asyncio.to_thread(load, e, model, sizes, threads, args.gpu_layers, 1)
        for e in ENGINES
    }
    try:
        header = (
            f"model {model.name} ({engines['ctransformers'].info.model}), threads {threads}, "
            f"n_ctx {sizes.n_ctx}, gpu_layers {args.gpu_layers}"
        )
        ratios = await single_session_ratios(engines, sizes, chatter)
    finally:
        for engine in engines.values():
            await engine.close()
    batched = await asyncio.to_thread(
        load, "llama-cpp", model, sizes, threads, args.gpu_layers, CONCURRENT
    )
    try:
        lc, lc_rate = await concurrency_ratio(
            "llama-cpp", batched, sizes, threads,
            "one context, a sequence per session, their steps batched into one llama_decode",
        )
    finally:
        await batched.close()
    share = max(1, threads // CONCURRENT)
    parallel = await asyncio.to_thread(
        load, "ctransformers", model, sizes, share, args.gpu_layers, CONCURRENT
    )
    try:
        ct, ct_rate = await concurrency_ratio(
            "ctransformers", parallel, sizes, share,
            f"{CONCURRENT} contexts evaluating side by side, each on its share of the threads",
        )
    finally:
        await parallel.close()
    both = Ratio(
        f"{CONCURRENT} sessions at once, decode tok/s llama-cpp ÷ ctransformers",
        lc_rate / ct_rate, 1.0, at_most=False,
        detail=f"llama-cpp {lc_rate:.0f} tok/s in all, ctransformers {ct_rate:.0f} tok/s in all",
    )
    ratios += [lc, ct, both, await thread_share_ratio(model, sizes, args.gpu_layers)]
    real = real_model_path(args, model)
    if real is not None:
        shape = REAL_QUICK if args.quick else REAL_FULL
        real_sizes = real_model.RealSizes(threads=threads, **shape)
        ratios += await real_model.measure(real[0], real[1], real_sizes, sizes.n_ctx)
    return header, ratios


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description="Both engines side by side: ratios in one run.")
    p.add_argument("--model", type=Path, help="GGUF to measure (default: the bench model)")
    p.add_argument("--threads", type=int, default=0, help="threads per evaluation (0: all)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded to CUDA")
    p.add_argument("--real-model", default="smollm2",
                   help="GGUF or model name measured through the node and raw (default smollm2)")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and print the table; 0 whatever the verdicts, 2 without llama-cpp."""
    args = parse_args(argv)
    if not llama_cpp_available():
        print(f"the llama-cpp engine is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 2
    quiet_logs()
    sizes = QUICK if args.quick else FULL
    start = time.perf_counter()
    model = args.model or bench_model(sizes.shape, "quick" if args.quick else "bench")
    header, ratios = asyncio.run(run_all(args, sizes, model))
    title = "infernode engines compared"
    if args.quick:
        title += " (--quick: sizes too small for the targets to mean anything)"
    print_table(f"{title}\n{header}", ratios)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
