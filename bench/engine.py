"""Engine benchmark: four ratios measured side by side in one run, each against its target.

    python bench/engine.py [--model PATH] [--threads N] [--gpu-layers N] [--llama-lib PATH]
    python bench/engine.py --quick      # tiny model, small sizes: checks that it runs

It measures the ctransformers engine (the one that shares ctransformers' library).

1. decode tok/s of the engine ÷ ctransformers' own ``LLM`` (greedy, same prompt ids, same
   number of tokens, same threads, same library), alternating runs, medians;
2. TTFT of a turn whose ~2,000-token history is in the slot ÷ TTFT of the same kind of
   turn on a fresh slot (100 new tokens each);
3. restoring a banked snapshot of those tokens ÷ evaluating them again, through the engine's
   own bank path (``SlotEngine.snapshot`` → ``BankStore`` → restore on the session's next turn);
4. RSS with 4 resident sessions ÷ RSS with 1, each in a fresh child process.

Without ``--model`` it writes the random-weight bench model (``node.demo_model.BENCH``) once
into a temporary directory and reuses it. It exits 0 whatever the verdicts: it is a
benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make the repository root importable for ``bench.common``.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.engine.backends.ctransformers.backend import CtransformersBackend  # noqa: E402
from actors.engine.bank.meta import SnapshotMeta  # noqa: E402
from actors.engine.bank.store import BankEntry  # noqa: E402
from actors.engine.engine import SlotEngine  # noqa: E402
from actors.engine.interface import TurnOutcome  # noqa: E402
from actors.engine.loader import load_engine  # noqa: E402
from bench.common import (  # noqa: E402
    MIB,
    BenchError,
    Chatter,
    Ratio,
    bench_model,
    history_of,
    median,
    message_text,
    print_table,
    quiet_logs,
    reply_of,
    rss_bytes,
    run_child,
    spec_of,
    spread,
    turn,
    user,
)
from node.config import NodeConfig  # noqa: E402
from node.demo_model import BENCH, TINY, ModelShape  # noqa: E402
from schemas.chat import ChatMessage  # noqa: E402

_UNCAPPED = 1 << 40
"""Bank caps for the benchmark: a long history's state must always fit."""


@dataclass(frozen=True)
class Sizes:
    """How big and how often: the full run, or ``--quick``."""

    shape: ModelShape
    """Shape of the generated model (unused with ``--model``)."""
    n_ctx: int
    """Context length of every slot."""
    history: int
    """Tokens of the history a warm slot holds."""
    new: int
    """Tokens of the new user message of a turn."""
    decode: int
    """Tokens generated per decode run."""
    decode_reps: int
    """Decode runs per side."""
    cache_reps: int
    """Repetitions of the cold/restore/warm sequence."""
    slots: int = 4
    """Slots of the larger memory child."""
    threads: int = 0
    """Threads per evaluation unless --threads says (0: every core)."""


FULL = Sizes(BENCH, n_ctx=2560, history=2000, new=100, decode=128, decode_reps=7, cache_reps=3)
# One thread: on a busy machine, threads of a tiny model spend their time waiting on each other.
QUICK = Sizes(
    TINY, n_ctx=512, history=200, new=20, decode=16, decode_reps=3, cache_reps=1, threads=1
)


def threads_of(args: argparse.Namespace, sizes: Sizes) -> int:
    """Threads per evaluation, for both engines."""
    return int(args.threads or sizes.threads or os.cpu_count() or 1)


# -- 1. decode ------------------------------------------------------------------------------
def load_ctransformers(
    engine: SlotEngine, model: Path, sizes: Sizes, args: argparse.Namespace
) -> Any:
    """ctransformers' own LLM on the same file, library, threads and context length."""
    from ctransformers import AutoModelForCausalLM

    backend = engine.backend
    lib = backend.lib_path if isinstance(backend, CtransformersBackend) else None
    return AutoModelForCausalLM.from_pretrained(
        str(model),
        model_type="llama",
        threads=threads_of(args, sizes),
        context_length=sizes.n_ctx,
        gpu_layers=args.gpu_layers,
        lib=str(lib) if lib else None,
    )


def theirs_decode(llm: Any, prompt: Sequence[int], n: int) -> tuple[float, list[int]]:
    """tok/s of ctransformers' ``LLM.generate`` over the ``n`` tokens after its first one."""
    gen: Generator[int, None, None] = llm.generate(
        list(prompt), top_k=1, top_p=1.0, temperature=1.0, repetition_penalty=1.0
    )
    tokens = [next(gen)]  # the prompt is evaluated before the first token comes out
    start = time.perf_counter()
    for token in gen:
        tokens.append(token)
        if len(tokens) > n:
            break
    elapsed = time.perf_counter() - start
    gen.close()
    return (len(tokens) - 1) / elapsed, tokens[:n]


async def ours_decode(
    engine: SlotEngine, messages: Sequence[ChatMessage], n: int
) -> tuple[float, list[int]]:
    """tok/s of a turn's decode loop, from the engine's own ``decode_ms``."""
    out = await turn(engine, "decode", messages, max_tokens=n)
    rate = out.usage.completion_tokens / (out.timings.decode_ms / 1000)
    return rate, list(out.completion_ids or ())


async def decode_ratio(engine: SlotEngine, llm: Any, sizes: Sizes, chatter: Chatter) -> Ratio:
    """Ratio 1: our decode tok/s ÷ ctransformers' LLM decode tok/s, alternating runs."""
    messages = [user(chatter.words(32))]
    prompt = engine.prompt_tokens(spec_of("decode", messages))
    rates: dict[str, list[float]] = {"ours": [], "theirs": []}
    ids: dict[str, list[int]] = {}
    for rep in range(-1, sizes.decode_reps):  # rep -1 warms both up and is not counted
        for side in ("ours", "theirs") if rep % 2 else ("theirs", "ours"):
            if side == "ours":
                rate, ids[side] = await ours_decode(engine, messages, sizes.decode)
            else:
                rate, ids[side] = theirs_decode(llm, prompt, sizes.decode)
            if rep >= 0:
                rates[side].append(rate)
    await engine.forget("decode")
    ours, theirs = rates["ours"], rates["theirs"]
    same = "yes" if ids["ours"] == ids["theirs"] else "NO"
    detail = (
        f"ours {median(ours):.1f} tok/s ({spread(ours)}), ctransformers LLM "
        f"{median(theirs):.1f} tok/s ({spread(theirs)})\n"
        f"median of {sizes.decode_reps} alternating runs of {sizes.decode} tokens after a "
        f"{len(prompt)}-token prompt; same greedy tokens: {same}"
    )
    value = median([a / b for a, b in zip(ours, theirs, strict=True)])
    return Ratio("decode tok/s: ours / ctransformers LLM", value, 0.95, False, detail)


# -- 2. and 3. warm vs cold TTFT, restore vs recompute ---------------------------------------
@dataclass(frozen=True)
class Banked:
    """A banked history state, for the memory children to restore into their slots."""

    messages: tuple[ChatMessage, ...]
    """The conversation whose prompt the state holds."""
    tokens: tuple[int, ...]
    """Tokens of the state."""
    data: bytes
    """The state bytes."""


@dataclass
class CacheRuns:
    """Per-repetition outcomes of the cache measurements."""

    cold: list[TurnOutcome] = field(default_factory=list)
    restored: list[TurnOutcome] = field(default_factory=list)
    warm: list[TurnOutcome] = field(default_factory=list)
    snapshot_ms: list[float] = field(default_factory=list)
    nbytes: int = 0
    banked: Banked | None = None


async def cache_rep(
    engine: SlotEngine, sizes: Sizes, chatter: Chatter, history: list[ChatMessage],
    runs: CacheRuns, rep: int,
) -> None:
    """Cold turn, snapshot, eviction, restore turn, warm turn: one session, one slot."""
    session = f"history-{rep}"
    first = [*history, user(message_text(engine, chatter, sizes.new))]
    cold = await turn(engine, session, first)
    if cold.cache.source != "none":
        raise BenchError(f"the cold turn found a cache ({cold.cache.source})")
    runs.cold.append(cold)
    if engine.bank is not None:
        snap = await engine.snapshot(session, cold.token_hash, 600)
        if not snap.stored:
            raise BenchError(f"the snapshot was not stored: {snap.reason}")
        runs.snapshot_ms.append(snap.ms)
        runs.nbytes = snap.nbytes
        runs.banked = runs.banked or banked_state(engine, session, cold.token_hash, first)
    await turn(engine, "evictor", [user("hi")], max_tokens=1)  # takes the only slot
    second = [*first, reply_of(cold), user(message_text(engine, chatter, sizes.new))]
    ids = {len(first): cold.completion_ids or ()}
    runs.restored.append(restored := await turn(engine, session, second, ids=ids))
    third = [*second, reply_of(restored), user(message_text(engine, chatter, sizes.new))]
    ids[len(second)] = restored.completion_ids or ()
    warm = await turn(engine, session, third, ids=ids)
    if warm.cache.source != "slot":
        raise BenchError(f"the warm turn did not find its slot ({warm.cache.miss_reason})")
    runs.warm.append(warm)
    await engine.forget(session)
    await engine.forget("evictor")


def banked_state(
    engine: SlotEngine, session: str, digest: str, messages: list[ChatMessage]
) -> Banked:
    """The bank entry ``session`` just stored for the state ``digest``."""
    assert engine.bank is not None
    entry = engine.bank.get(session, digest)
    if entry is None:
        raise BenchError("the snapshot just taken is not in the bank")
    return Banked(tuple(messages), entry.tokens, entry.data)


async def cache_ratios(
    engine: SlotEngine, sizes: Sizes, chatter: Chatter
) -> tuple[Ratio, Ratio, Banked | None]:
    """Ratios 2 and 3, from ``cache_reps`` repetitions of ``cache_rep``."""
    history = history_of(engine, chatter, sizes.history)
    runs = CacheRuns()
    for rep in range(sizes.cache_reps):
        await cache_rep(engine, sizes, chatter, history, runs, rep)
    return ttft_ratio(runs), restore_ratio(engine, runs), runs.banked


def ttft_ratio(runs: CacheRuns) -> Ratio:
    """Ratio 2: warm TTFT ÷ cold TTFT."""
    cold = [o.timings.ttft_ms for o in runs.cold]
    warm = [o.timings.ttft_ms for o in runs.warm]
    c, w = runs.cold[-1].usage, runs.warm[-1].usage
    detail = (
        f"warm {median(warm):.0f} ms ({spread(warm, '{:.0f}')}): {w.prompt_tokens} prompt "
        f"tokens, {w.cached_tokens} from the slot, {w.new_prefill_tokens} evaluated\n"
        f"cold {median(cold):.0f} ms ({spread(cold, '{:.0f}')}): {c.prompt_tokens} prompt "
        f"tokens, all evaluated on a fresh slot; median of {len(cold)}"
    )
    value = median([a / b for a, b in zip(warm, cold, strict=True)])
    return Ratio("TTFT: warm slot / cold slot", value, 0.1, True, detail)


def restore_ratio(engine: SlotEngine, runs: CacheRuns) -> Ratio:
    """Ratio 3: restoring the banked state ÷ evaluating its tokens again."""
    name = "history: restore snapshot / recompute"
    if engine.bank is None:
        return Ratio(name, None, 0.1, True, f"snapshots are off: {engine.info.snapshot_note}")
    if any(o.cache.source != "bank" for o in runs.restored):
        return Ratio(name, None, 0.1, True, "a returning session was not restored from the bank")
    restore = [o.cache.restore_ms for o in runs.restored]
    recompute = [o.timings.prefill_ms for o in runs.cold]
    detail = (
        f"restore {median(restore):.0f} ms ({spread(restore, '{:.0f}')}) of "
        f"{runs.nbytes / MIB:.1f} MiB; recompute {median(recompute):.0f} ms "
        f"({spread(recompute, '{:.0f}')}) of {runs.cold[-1].usage.new_prefill_tokens} tokens; "
        f"snapshot taken in {median(runs.snapshot_ms):.0f} ms\n"
        "path: SlotEngine.snapshot -> BankStore -> restore when the evicted session returns "
        "(CacheInfo.restore_ms)"
    )
    value = median([a / b for a, b in zip(restore, recompute, strict=True)])
    return Ratio(name, value, 0.1, True, detail)


# -- 4. memory ------------------------------------------------------------------------------
def memory_ratio(
    args: argparse.Namespace, sizes: Sizes, model: Path, banked: Banked | None, weights: int
) -> Ratio:
    """Ratio 4: RSS of a child with ``sizes.slots`` resident sessions ÷ one with 1."""
    name = f"RSS: {sizes.slots} slots / 1 slot"
    if banked is None:
        return Ratio(name, None, 0.0, True, "needs snapshots, which are off")
    with tempfile.TemporaryDirectory(prefix="infernode-bench-") as tmp:
        state = Path(tmp) / "state.bin"
        state.write_bytes(banked.data)
        payload = Path(tmp) / "child.json"
        payload.write_text(json.dumps({
            "settings": child_settings(args, sizes, model),
            "state": str(state),
            "tokens": list(banked.tokens),
            "messages": [m.model_dump() for m in banked.messages],
        }))
        script = str(Path(__file__).resolve())
        one, many = (
            run_child([script, "--rss-child", str(n), "--child-input", str(payload)], 600)
            for n in (1, sizes.slots)
        )
    rss1, rssn = int(str(one["rss"])), int(str(many["rss"]))
    snap1, snapn = int(str(one["rss_snapshotted"])), int(str(many["rss_snapshotted"]))
    kv, extra = len(banked.data), sizes.slots - 1
    expected = 1 + extra * kv / weights
    detail = (
        f"1 slot {rss1 / MIB:.0f} MiB, {sizes.slots} slots {rssn / MIB:.0f} MiB: "
        f"{(rssn - rss1) / extra / MIB:.0f} MiB per extra slot, each holding "
        f"{len(banked.tokens)} tokens\n"
        f"expected 1 + {extra}·KV/weights = 1 + {extra}·{kv / MIB:.1f}/{weights / MIB:.1f} MiB "
        f"= {expected:.3f}; the target is that + 10%\n"
        f"after one snapshot of every slot (bank emptied again): 1 slot {snap1 / MIB:.0f} MiB, "
        f"{sizes.slots} slots {snapn / MIB:.0f} MiB ({(snapn - rssn) / sizes.slots / MIB:.0f} "
        "MiB more per slot)"
    )
    return Ratio(name, rssn / rss1, round(expected * 1.1, 3), True, detail)


def child_settings(args: argparse.Namespace, sizes: Sizes, model: Path) -> dict[str, object]:
    """What a memory child needs to load the same engine."""
    return {
        "model": str(model),
        "n_ctx": sizes.n_ctx,
        "threads": threads_of(args, sizes),
        "gpu_layers": args.gpu_layers,
        "llama_lib": str(args.llama_lib) if args.llama_lib else None,
    }


def bank_entry(engine: SlotEngine, session: str, tokens: tuple[int, ...], data: bytes) -> BankEntry:
    """An entry of ``session`` holding ``data``, restorable by ``engine``."""
    c = engine.compat
    meta = SnapshotMeta(
        session=session, tokens=tokens, nbytes=len(data),
        model_id=c.model_id, n_ctx=c.n_ctx, template=c.template,
    )
    return BankEntry(meta, data)


async def rss_child(n_slots: int, payload_path: Path) -> dict[str, object]:
    """In a fresh process: ``n_slots`` sessions restored from the bank into slots, then RSS."""
    payload = json.loads(payload_path.read_text())
    s = payload["settings"]
    engine = load_engine(NodeConfig(
        model=Path(s["model"]), engine="ctransformers", n_slots=n_slots, n_ctx=s["n_ctx"],
        threads=s["threads"],
        gpu_layers=s["gpu_layers"], llama_lib=Path(s["llama_lib"]) if s["llama_lib"] else None,
        bank_ram_bytes=_UNCAPPED, bank_session_bytes=_UNCAPPED, verify_restore=False,
    ))
    try:
        assert engine.bank is not None
        data = Path(payload["state"]).read_bytes()
        tokens = tuple(payload["tokens"])
        messages = [ChatMessage.model_validate(m) for m in payload["messages"]]
        digests: dict[str, str] = {}
        for k in range(n_slots):
            session = f"resident-{k}"
            engine.bank.put(bank_entry(engine, session, tokens, data))
            out = await turn(engine, session, messages)
            if out.cache.source != "bank":
                raise BenchError(f"{session} was not restored ({out.cache.miss_reason})")
            engine.bank.forget(session)  # only the slots' own memory is measured
            digests[session] = out.token_hash
        del data
        gc.collect()
        rss = rss_bytes()
        for session, digest in digests.items():
            snap = await engine.snapshot(session, digest, 600)
            if not snap.stored:
                raise BenchError(f"{session} could not be snapshotted ({snap.reason})")
            engine.bank.forget(session)
        gc.collect()
        return {"rss": rss, "rss_snapshotted": rss_bytes()}
    finally:
        await engine.close()


# -- the run ----------------------------------------------------------------------------------
async def run_all(args: argparse.Namespace, sizes: Sizes, model: Path) -> tuple[str, list[Ratio]]:
    """Load the engine once, measure ratios 1–3 in this process and 4 in children."""
    engine = await asyncio.to_thread(load_engine, NodeConfig(
        model=model, engine="ctransformers", n_slots=1, n_ctx=sizes.n_ctx, threads=threads_of(args, sizes),
        gpu_layers=args.gpu_layers, llama_lib=args.llama_lib,
        bank_ram_bytes=_UNCAPPED, bank_session_bytes=_UNCAPPED,
    ))
    chatter = Chatter(7)
    try:
        backend = engine.backend
        ct = backend if isinstance(backend, CtransformersBackend) else None
        weights = ct.model.size_bytes if ct else 0
        header = (
            f"model {model.name} ({engine.info.model}, {weights / MIB:.0f} MiB), "
            f"threads {threads_of(args, sizes)}, n_ctx {sizes.n_ctx}, "
            f"gpu_layers {args.gpu_layers}\n"
            f"library {ct.lib_path if ct else '?'}; "
            f"snapshots: {engine.info.snapshot_note or 'on'}"
        )
        llm = load_ctransformers(engine, model, sizes, args)
        decode = await decode_ratio(engine, llm, sizes, chatter)
        del llm  # its weights and threads stay out of the measurements that follow
        gc.collect()
        ttft, restore, banked = await cache_ratios(engine, sizes, chatter)
    finally:
        await engine.close()
    memory = memory_ratio(args, sizes, model, banked, weights)
    return header, [decode, ttft, restore, memory]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description="Engine benchmark: ratios against their targets.")
    p.add_argument("--model", type=Path, help="GGUF to measure (default: the bench model)")
    p.add_argument("--threads", type=int, default=0, help="threads per evaluation (0: all)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded to CUDA")
    p.add_argument("--llama-lib", type=Path, help="llama library instead of ctransformers'")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run")
    p.add_argument("--rss-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child-input", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; 0 whatever the verdicts."""
    args = parse_args(argv)
    quiet_logs()
    if args.rss_child:
        print(json.dumps(asyncio.run(rss_child(args.rss_child, args.child_input))))
        return 0
    sizes = QUICK if args.quick else FULL
    start = time.perf_counter()
    model = args.model or bench_model(sizes.shape, "quick" if args.quick else "bench")
    header, ratios = asyncio.run(run_all(args, sizes, model))
    title = "infernode engine benchmark"
    if args.quick:
        title += " (--quick: sizes too small for the targets to mean anything)"
    print_table(f"{title}\n{header}", ratios)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
