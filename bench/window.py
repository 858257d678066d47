"""A conversation that outgrows the context: what the turns after the window fills cost.

    python bench/window.py [--model PATH|smollm2] [--threads N] [--llama-server PATH]
    python bench/window.py --quick      # tiny model, small context: checks that it runs

One session takes turns of the same size until its window has moved (the first turn that
drops old turns), then 10 more. Printed, per system:

1. mean TTFT of the 10 turns from the one where the window first moved ÷ mean TTFT of the
   warm turns before it (turns 2 on), target <= 1.5 with ``--overflow shift``;
2. prefix-hit tokens ÷ kept tokens over those 10 turns (target >= 0.9): kept tokens are the
   prompt less what the turn adds (its new message, measured on the warm turns), so a
   system that evaluates the kept window again scores low.

Systems: infernode with ``--overflow shift`` and with ``truncate``, and llama.cpp's
``llama-server --context-shift`` (and with ``--cache-reuse``, its way to reuse shifted KV
cells across requests). llama-server refuses a chat prompt longer than its context — its
context shift acts while generating — so its client drops the oldest whole turns the way
infernode's window does (down to half the context); without llama-server its column is n/a
and the run still exits 0. One slot each, the same model, threads and context.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench.anchor import Words, mean, user  # noqa: E402
from bench.anchor_sides import HttpSide, NodeSide, Setup, llama_server_side, node_side  # noqa: E402
from bench.common import Ratio, bench_model, print_table, quiet_logs  # noqa: E402
from bench.llama_server import Streamed, find_llama_server, not_built_note, stream_chat  # noqa: E402
from node.demo_model import BENCH, TINY  # noqa: E402
from node.models import resolve_model  # noqa: E402

KEEP_FRACTION = 0.5
"""Where a client-side window moves to, as infernode's (actors/engine/window.py)."""


@dataclass(frozen=True)
class Sizes:
    """How big: the full run, or ``--quick``."""

    n_ctx: int
    """Context length of the one slot."""
    turn_tokens: int
    """New tokens of each user message."""
    out: int
    """Tokens generated per turn."""
    after: int = 10
    """Turns measured once the window moved."""


FULL = Sizes(n_ctx=1024, turn_tokens=100, out=8)
QUICK = Sizes(n_ctx=256, turn_tokens=24, out=4, after=4)


@dataclass
class Run:
    """One system's turns: TTFT, prompt and cached tokens, and where the window moved."""

    ttft: list[float] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    moved_at: int | None = None
    """Index of the first turn that dropped old turns."""


class WindowedHttpSide(HttpSide):
    """An OpenAI server whose client keeps the conversation within ``n_ctx``: it drops the
    oldest whole turns (never the system message) down to half the context when the next
    prompt would not fit, as infernode's window policy does on the node."""

    def __init__(self, side: HttpSide, n_ctx: int) -> None:
        super().__init__(side.name, side.base, side.extra)
        self.n_ctx = n_ctx
        self.per_char = 0.5
        """Tokens per character of the conversation, from the latest usage."""
        self.dropped = 0

    def _tokens(self, conv: Sequence[dict[str, str]]) -> int:
        return int(sum(len(m["content"]) + 8 for m in conv) * self.per_char)

    def _cut(self, conv: list[dict[str, str]], limit: int) -> None:
        while self._tokens(conv) > limit and len(conv) > 3:  # system + the newest user msg
            del conv[1:3]  # the oldest user message and its answer
            self.dropped += 1

    async def chat(self, session: str, new: Sequence[dict[str, str]], max_tokens: int) -> Streamed:
        conv = self.conversations.setdefault(session, [])
        conv.extend(new)
        if self._tokens(conv) + max_tokens > self.n_ctx:
            self._cut(conv, int((self.n_ctx - max_tokens) * KEEP_FRACTION))
        start = time.perf_counter()
        while True:
            sent = time.perf_counter()
            try:
                out = await stream_chat(self.base, conv, max_tokens, self.extra)
                break
            except httpx.HTTPStatusError:  # over the context after all: one turn more
                if len(conv) <= 3:
                    raise
                self._cut(conv, self._tokens(conv) - 1)
        # A refused attempt is part of what this turn cost the client.
        out.ttft_ms += (sent - start) * 1000
        prompt = out.usage.get("prompt_tokens")
        if isinstance(prompt, int) and prompt:
            self.per_char = prompt / sum(len(m["content"]) + 8 for m in conv)
        conv.append({"role": "assistant", "content": out.text})
        return out


async def conversation(side: HttpSide | NodeSide, words: Words, sizes: Sizes) -> Run:
    """Turns of one session until the window moved and ``sizes.after`` turns from there."""
    run = Run()
    system = {"role": "system", "content": "You are an agent that relays notes to a peer."}
    for t in range(400):
        new = [user(words.text(sizes.turn_tokens))]
        out = await side.chat("window", [system, *new] if t == 0 else new, sizes.out)
        run.ttft.append(out.ttft_ms)
        prompt = out.usage.get("prompt_tokens")
        run.prompt.append(prompt if isinstance(prompt, int) else 0)
        run.cached.append(out.cached_tokens)
        if run.moved_at is None and _moved(side, out):
            run.moved_at = t
        if run.moved_at is not None and t >= run.moved_at + sizes.after - 1:
            return run
    raise RuntimeError(f"{side.name}: the window never moved in 400 turns")


def _moved(side: HttpSide | NodeSide, out: Streamed) -> bool:
    if isinstance(side, WindowedHttpSide):
        return side.dropped > 0
    dropped = out.usage.get("dropped_turns")
    return isinstance(dropped, int) and dropped > 0


@dataclass(frozen=True)
class Verdict:
    """One system's two ratios and what they were made of."""

    after_over_warm: float
    hit: float
    detail: str


def verdict(run: Run, new_tokens: int, sizes: Sizes) -> Verdict:
    """After-fill TTFT ÷ warm TTFT, and cached ÷ kept tokens over the turns after the fill."""
    assert run.moved_at is not None
    warm = run.ttft[1:run.moved_at]
    after = slice(run.moved_at, run.moved_at + sizes.after)
    kept = sum(max(0, p - new_tokens) for p in run.prompt[after])
    cached = sum(run.cached[after])
    ratio = mean(run.ttft[after]) / mean(warm) if warm else float("nan")
    detail = (f"window moved at turn {run.moved_at + 1}; warm TTFT {mean(warm):.0f} ms over "
              f"{len(warm)} turns, next {sizes.after} turns {mean(run.ttft[after]):.0f} ms "
              f"(max {max(run.ttft[after]):.0f}); cached {cached} of {kept} kept tokens")
    return Verdict(ratio, cached / kept if kept else 0.0, detail)


def new_part(run: Run, out: int) -> int:
    """Tokens a turn adds to the prompt (its message and the template around it): the
    smallest growth of the prompt between warm turns, less the previous reply (``out``
    tokens at most: a shorter reply makes this smaller and the kept part larger)."""
    growth = [b - a for a, b in zip(run.prompt[1:run.moved_at], run.prompt[2:run.moved_at],
                                    strict=False)]
    return max(0, min(growth) - out) if growth else 0


@contextlib.asynccontextmanager
async def systems(setup: Setup, binary: Path | None, sizes: Sizes
                  ) -> AsyncIterator[dict[str, HttpSide | NodeSide | str]]:
    """infernode shift and truncate, llama-server with context shift (± cache reuse)."""
    async with contextlib.AsyncExitStack() as stack:
        up: dict[str, HttpSide | NodeSide | str] = {}
        for policy in ("shift", "truncate"):
            name = f"infernode {policy}"
            opened = await stack.enter_async_context(
                node_side(name, "llama-cpp", Setup(setup.model, setup.threads, setup.n_ctx, 1,
                                                   overflow=policy)))
            up[name] = opened
        for name, extra in (("llama-server --context-shift", ["--context-shift"]),
                            ("llama-server --context-shift --cache-reuse 32",
                             ["--context-shift", "--cache-reuse", "32"])):
            if binary is None:
                up[name] = not_built_note()
                continue
            opened_http = await stack.enter_async_context(llama_server_side(
                binary, Setup(setup.model, setup.threads, setup.n_ctx, 1), extra, name))
            up[name] = opened_http if isinstance(opened_http, str) else \
                WindowedHttpSide(opened_http, sizes.n_ctx)
        yield up


async def measure(setup: Setup, sizes: Sizes, binary: Path | None) -> list[Ratio]:
    """The conversation on every system, one after the other; the ratios."""
    words = {}
    verdicts: dict[str, Verdict | str] = {}
    async with systems(setup, binary, sizes) as up:
        for name, side in up.items():
            if isinstance(side, str):
                verdicts[name] = side
                continue
            words[name] = Words(setup.model, 5)  # the same text on every system
            await side.chat("warm-up", [user("Hello.")], 2)  # first-call costs, untimed
            began = time.perf_counter()
            try:
                run = await conversation(side, words[name], sizes)
            except Exception as e:  # noqa: BLE001 - one failed side must not end the run
                verdicts[name] = f"n/a ({e!r})"
                continue
            print(f"{name}: {len(run.ttft)} turns in {time.perf_counter() - began:.1f} s",
                  file=sys.stderr)
            verdicts[name] = verdict(run, new_part(run, sizes.out), sizes)
    return table(verdicts)


def table(verdicts: dict[str, Verdict | str]) -> list[Ratio]:
    """Two ratios per system, and ours ÷ llama-server's after-fill TTFT ratio."""
    out: list[Ratio] = []
    for name, v in verdicts.items():
        target = 1.5
        if isinstance(v, str):
            out += [Ratio(f"{name}: after-fill / warm TTFT", None, target, True, v),
                    Ratio(f"{name}: prefix-hit / kept tokens", None, 0.9, False, v)]
        else:
            out += [Ratio(f"{name}: after-fill / warm TTFT", v.after_over_warm, target, True,
                          v.detail),
                    Ratio(f"{name}: prefix-hit / kept tokens", v.hit, 0.9, False, "")]
    ours, theirs = verdicts.get("infernode shift"), verdicts.get("llama-server --context-shift")
    both = isinstance(ours, Verdict) and isinstance(theirs, Verdict)
    out.append(Ratio("after-fill / warm TTFT: infernode shift / llama-server",
                     ours.after_over_warm / theirs.after_over_warm  # type: ignore[union-attr]
                     if both else None, 1.0, True,
                     "" if both else str(theirs if isinstance(theirs, str) else ours)))
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description="Turns after the window fills, side by side")
    p.add_argument("--model", default=None,
                   help="GGUF or installed model name (default: the random-weight bench model)")
    p.add_argument("--threads", type=int, default=0, help="threads per evaluation (0: every core)")
    p.add_argument("--ctx", type=int, default=0, help="context length (default 1024, quick 256)")
    p.add_argument("--llama-server", type=Path, default=None, help="the llama-server binary")
    p.add_argument("--quick", action="store_true", help="tiny model, small context: a smoke run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conversation on every system and print the table; 0 whatever the verdicts."""
    args = parse_args(argv)
    quiet_logs()
    sizes = QUICK if args.quick else FULL
    if args.ctx:
        sizes = Sizes(args.ctx, sizes.turn_tokens, sizes.out, sizes.after)
    if args.model:
        model = resolve_model(Path(args.model)) or Path(args.model)
    else:
        model = bench_model(TINY, "tiny") if args.quick else bench_model(BENCH, "bench")
    threads = args.threads or os.cpu_count() or 1
    setup = Setup(model, threads, sizes.n_ctx, 1)
    start = time.perf_counter()
    ratios = asyncio.run(measure(setup, sizes, find_llama_server(args.llama_server)))
    title = (f"window: model {model.name}, {threads} threads, n_ctx {sizes.n_ctx}, "
             f"{sizes.turn_tokens}-token turns, {sizes.out} out")
    if args.quick:
        title += " (--quick: sizes too small for the targets to mean anything)"
    print_table(title, ratios)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
