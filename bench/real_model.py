"""A real model through the node and raw: first-turn and warm-turn TTFT, decode tok/s.

Through the node: a whole ``Node`` (embedded nats-server, every actor) and a client that
streams the turn's token events. TTFT runs from publishing the prompt to its first token
event; decode tok/s counts the tokens after the first over the time after it. Raw:
llama-cpp-python's own ``Llama`` on the same file, threads and flash-attention setting,
streaming ``create_completion`` on the same prompt ids; a first turn starts from an empty
cache (``reset``), a warm turn is the conversation's next one, which ``Llama`` answers from
its prefix cache as the node answers from the session's slot. Node and raw runs alternate.

Per engine: every engine that can load the file runs through the node; an engine that
cannot is listed with the reason its header check gives (ctransformers cannot read
SmolLM2's current BPE vocabulary). Raw means llama-cpp-python, the library the llama-cpp
engine runs on.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.engine.gguf_info import ctransformers_refusal, read_gguf_info
from actors.engine.templates.choice import select_template
from bench.common import Ratio, median, spread
from node.app import Node
from node.client import InfernodeClient, TurnResult
from node.config import NodeConfig
from schemas.chat import ChatMessage, SamplingParams

GREEDY = SamplingParams(temperature=0.0)
NAME = "real model"
"""How the ratios name the model (the detail lines say which)."""
_TOPIC = ("The harbour town wakes before dawn: boats slip their moorings, gulls circle the "
          "market and the baker pulls the first loaves from an old oven. ")


@dataclass
class Timings:
    """Per-run numbers of one side (an engine through the node, or raw)."""

    first_ttft_ms: list[float] = field(default_factory=list)
    warm_ttft_ms: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)

    def line(self, who: str) -> str:
        """One detail line of medians and spreads."""
        return (
            f"{who}: first-turn TTFT {median(self.first_ttft_ms):.0f} ms "
            f"(runs {spread(self.first_ttft_ms, '{:.0f}')}), warm-turn TTFT "
            f"{median(self.warm_ttft_ms):.0f} ms (runs {spread(self.warm_ttft_ms, '{:.0f}')}), "
            f"decode {median(self.decode_tps):.0f} tok/s"
        )


@dataclass(frozen=True)
class RealSizes:
    """How long the prompts are and how many runs."""

    paragraphs: int
    """Paragraphs of the first user message (about 35 tokens each)."""
    decode: int
    """Tokens generated per turn."""
    reps: int
    """Conversations per side."""
    threads: int
    """Threads per evaluation on both sides."""


def conversation(sizes: RealSizes, rep: int) -> tuple[list[ChatMessage], ChatMessage]:
    """The first turn's messages and the warm turn's new user message."""
    first = [
        ChatMessage(role="system", content="You are a concise guide."),
        ChatMessage(role="user", content=f"Visit {rep}. " + _TOPIC * sizes.paragraphs
                    + "What should I see first?"),
    ]
    return first, ChatMessage(role="user", content="And after that, where should I eat?")


def _rate(n_tokens: int, first_at: float, end: float) -> float:
    return (n_tokens - 1) / (end - first_at) if n_tokens > 1 and end > first_at else 0.0


async def _node_turn(client: InfernodeClient, session: str, messages: Sequence[ChatMessage],
                     decode: int) -> tuple[float, float, str]:
    """(TTFT ms, decode tok/s, reply text) of one turn through the node."""
    result = TurnResult()
    start = time.perf_counter()
    first_at: float | None = None
    async for _token in client.prompt(session, messages, sampling=GREEDY, max_tokens=decode,
                                      result=result):
        first_at = first_at or time.perf_counter()
    end = time.perf_counter()
    assert result.done is not None
    n = result.done.usage.completion_tokens
    return ((first_at or end) - start) * 1000, _rate(n, first_at or end, end), result.text


def _raw_turn(llm: Any, ids: list[int], decode: int) -> tuple[float, float, str]:
    """(TTFT ms, decode tok/s, text) of one streamed greedy completion on ``Llama``."""
    start = time.perf_counter()
    first_at: float | None = None
    pieces: list[str] = []
    for chunk in llm.create_completion(ids, max_tokens=decode, temperature=0.0, stream=True):
        first_at = first_at or time.perf_counter()
        pieces.append(chunk["choices"][0]["text"])
    end = time.perf_counter()
    n = len(llm.tokenize("".join(pieces).encode(), add_bos=False, special=True))
    return ((first_at or end) - start) * 1000, _rate(n, first_at or end, end), "".join(pieces)


class RawSide:
    """llama-cpp-python on the model, prompts rendered with the node's own template."""

    def __init__(self, model: Path, sizes: RealSizes, n_ctx: int) -> None:
        from llama_cpp import Llama

        info = read_gguf_info(model)
        self.llm = Llama(str(model), n_ctx=n_ctx, n_threads=sizes.threads,
                         n_threads_batch=sizes.threads, flash_attn=False, verbose=False)
        bos = info.bos_token or ""
        self.template = select_template("auto", info.chat_template, bos, info.eos_token or "")

    def ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        text = self.template.render(messages)
        return list(self.llm.tokenize(text.encode(), add_bos=False, special=True))

    def conversation(self, sizes: RealSizes, rep: int, into: Timings) -> None:
        first, follow = conversation(sizes, rep)
        self.llm.reset()
        ttft, _, reply = _raw_turn(self.llm, self.ids(first), sizes.decode)
        into.first_ttft_ms.append(ttft)
        history = [*first, ChatMessage(role="assistant", content=reply), follow]
        ttft, tps, _ = _raw_turn(self.llm, self.ids(history), sizes.decode)
        into.warm_ttft_ms.append(ttft)
        into.decode_tps.append(tps)

    def close(self) -> None:
        self.llm.close()


async def _node_conversation(client: InfernodeClient, sizes: RealSizes, rep: int,
                             tag: str, into: Timings) -> None:
    first, follow = conversation(sizes, rep)
    ttft, _, _ = await _node_turn(client, f"{tag}-{rep}", first, sizes.decode)
    into.first_ttft_ms.append(ttft)
    ttft, tps, _ = await _node_turn(client, f"{tag}-{rep}", [follow], sizes.decode)
    into.warm_ttft_ms.append(ttft)
    into.decode_tps.append(tps)


async def measure(model: Path, label: str, sizes: RealSizes, n_ctx: int) -> list[Ratio]:
    """Node (each engine that loads ``model``) and raw, alternating; the ratios."""
    engines = ["llama-cpp"]
    refusal = ctransformers_refusal(read_gguf_info(model))
    if refusal is None:
        engines.append("ctransformers")
    raw, node_side = Timings(), {e: Timings() for e in engines}
    side = RawSide(model, sizes, n_ctx)
    try:
        with tempfile.TemporaryDirectory(prefix="infernode-real-") as tmp:
            for engine in engines:
                await _run_engine(engine, model, sizes, n_ctx, Path(tmp), side, raw,
                                  node_side[engine])
    finally:
        side.close()
    return _ratios(label, raw, node_side, refusal)



async def _run_engine(engine: str, model: Path, sizes: RealSizes, n_ctx: int, tmp: Path,
                      side: RawSide, raw: Timings, into: Timings) -> None:
    config = NodeConfig(
        data_dir=tmp / engine, model=model, engine=engine, n_slots=2, n_ctx=n_ctx,
        threads=sizes.threads, flash_attn="off", verify_restore=False, heartbeat_s=0,
    )
    async with Node(config) as node, InfernodeClient(node.url, config=config) as client:
        for rep in range(sizes.reps):
            if engine == "llama-cpp":  # raw runs alternate with this engine's
                await asyncio.to_thread(side.conversation, sizes, rep, raw)
            await _node_conversation(client, sizes, rep, engine, into)


def _ratios(label: str, raw: Timings, node: dict[str, Timings], refusal: str | None
            ) -> list[Ratio]:
    lc = node["llama-cpp"]
    lines = [lc.line("llama-cpp through the node"), raw.line("llama-cpp-python raw")]
    if "ctransformers" in node:
        lines.append(node["ctransformers"].line("ctransformers through the node"))
    else:
        lines.append(f"ctransformers: cannot load {label}: {refusal}")
    detail = "\n".join([f"{NAME}: {label}", *lines])
    return [
        Ratio(f"{NAME} first-turn TTFT, node ÷ raw (llama-cpp)",
              median(lc.first_ttft_ms) / median(raw.first_ttft_ms), 1.5, at_most=True,
              detail=detail),
        Ratio(f"{NAME} warm-turn TTFT, node ÷ raw (llama-cpp)",
              median(lc.warm_ttft_ms) / median(raw.warm_ttft_ms), 1.5, at_most=True,
              detail="same runs"),
        Ratio(f"{NAME} decode tok/s, node ÷ raw (llama-cpp)",
              median(lc.decode_tps) / max(median(raw.decode_tps), 1e-9), 0.8, at_most=False,
              detail="same runs"),
    ]
