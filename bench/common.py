"""Helpers shared by the benchmarks: the bench model, turns and filler chat, medians, the table.

Benchmarks print ratios measured side by side in one run, so a noisy machine slows both
sides of a ratio alike; the absolute numbers behind each ratio are printed with it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Container, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

import node.demo_model
from actors.engine.engine import SlotEngine
from actors.engine.interface import CancelToken, TurnOutcome, TurnSpec
from node.demo_model import ModelShape, write_llama_gguf
from schemas.chat import ChatMessage, SamplingParams
from schemas.records import ReplyParams

MIB = 1 << 20
GREEDY = SamplingParams(temperature=0.0)
_WORDS = [
    "the", "of", "and", "to", "in", "is", "that", "it", "for", "on", "with", "as", "was",
    "at", "by", "be", "this", "are", "from", "or", "have", "one", "you", "not", "but", "what",
    "all", "were", "when", "we", "there", "can", "your", "each", "how", "their", "if", "will",
    "up", "other", "about", "out", "many", "then", "them", "these", "so", "some", "time",
    "more", "water", "people", "day", "part",
]  # fmt: skip


class BenchError(RuntimeError):
    """A benchmark step could not run (a child process failed, a cache did not hit, …)."""


def cache_dir() -> Path:
    """Where generated bench models are kept between runs."""
    return Path(tempfile.gettempdir()) / "infernode-bench"


def bench_model(shape: ModelShape, name: str) -> Path:
    """The random-weight model of ``shape``, written once and kept while its writer is unchanged."""
    writer = Path(node.demo_model.__file__).read_bytes()
    key = hashlib.sha256(repr(shape).encode() + writer).hexdigest()[:12]
    path = cache_dir() / f"{name}-{key}.gguf"
    if not path.is_file():
        # A private name first: two benchmark runs may write the same model at once.
        part = write_llama_gguf(path.with_name(f"{path.stem}.{os.getpid()}.gguf"), shape)
        part.replace(path)
    return path


def quiet_logs() -> None:
    """Only warnings from the engine, on stderr: stdout carries the benchmark's own lines."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


class Chatter:
    """Seeded filler text: histories and new messages the same in every run."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def words(self, n: int) -> str:
        """``n`` random words."""
        return " ".join(self._rng.choice(_WORDS) for _ in range(n))


def user(text: str) -> ChatMessage:
    """A user message."""
    return ChatMessage(role="user", content=text)


def reply_of(out: TurnOutcome) -> ChatMessage:
    """The assistant message a turn produced."""
    return ChatMessage(role="assistant", content=out.text)


def spec_of(
    session: str,
    messages: Sequence[ChatMessage],
    max_tokens: int = 4,
    ids: Mapping[int, tuple[int, ...]] | None = None,
) -> TurnSpec:
    """A greedy turn of ``session``; ``ids`` are the exact tokens of assistant messages."""
    return TurnSpec(
        session=session,
        turn_id=uuid.uuid4().hex,
        messages=tuple(messages),
        assistant_tokens=ids or {},
        params=ReplyParams(sampling=GREEDY, max_tokens=max_tokens),
    )


async def turn(
    engine: SlotEngine,
    session: str,
    messages: Sequence[ChatMessage],
    max_tokens: int = 4,
    ids: Mapping[int, tuple[int, ...]] | None = None,
) -> TurnOutcome:
    """Run one greedy turn on ``engine``, dropping the streamed text."""
    spec = spec_of(session, messages, max_tokens, ids)
    return await engine.run_turn(spec, lambda _text: None, CancelToken())


def message_text(engine: SlotEngine, chatter: Chatter, tokens: int) -> str:
    """User text of at least ``tokens`` tokens, one word over at most."""
    words: list[str] = []
    while len(engine.backend.tokenizer.encode(" ".join(words), False)) < tokens:
        words.append(chatter.words(1))
    return " ".join(words)


def history_of(engine: SlotEngine, chatter: Chatter, tokens: int) -> list[ChatMessage]:
    """User/assistant pairs whose rendered prompt holds at least ``tokens`` tokens."""
    per_message = max(8, min(60, tokens // 8))
    messages: list[ChatMessage] = []
    while not messages or len(engine.prompt_tokens(spec_of("count", messages))) < tokens:
        messages.append(user(chatter.words(per_message)))
        messages.append(ChatMessage(role="assistant", content=chatter.words(per_message)))
    return messages


def median(values: Sequence[float]) -> float:
    """The median; the benchmarks repeat every measurement and report this."""
    return float(statistics.median(values))


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; 0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def spread(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """``min–max`` of ``values``, to show how noisy a median is."""
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}"


def rss_bytes() -> int:
    """Resident set size of this process."""
    return int(psutil.Process().memory_info().rss)


def run_child(args: Sequence[str], timeout: float) -> dict[str, object]:
    """Run ``python ARGS`` and return the JSON object on the last line of its stdout."""
    cmd = [sys.executable, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{' '.join(cmd)} did not finish in {timeout:.0f} s") from e
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
        raise BenchError(f"child {' '.join(args[1:])} exited {proc.returncode}: {tail}")
    result = json.loads(lines[-1])
    if not isinstance(result, dict):
        raise BenchError(f"child printed {lines[-1]!r}, not a JSON object")
    return result


@dataclass(frozen=True)
class Ratio:
    """One line of the result table: a measured ratio, its target and what it was made of."""

    name: str
    """What is divided by what."""
    value: float | None
    """The ratio; None when it could not be measured."""
    target: float
    """The bound it must meet."""
    at_most: bool
    """True: the ratio passes at or below ``target``; False: at or above it."""
    detail: str
    """The absolute numbers behind the ratio."""

    @property
    def passed(self) -> bool:
        """Whether the ratio meets its target."""
        if self.value is None:
            return False
        return self.value <= self.target if self.at_most else self.value >= self.target

    @property
    def target_text(self) -> str:
        """The target as ``<= x`` or ``>= x``."""
        return f"{'<=' if self.at_most else '>='} {self.target:g}"


def print_table(title: str, ratios: Sequence[Ratio]) -> None:
    """Print each ratio with its target and PASS/FAIL, and its details indented below it."""
    width = max(len(r.name) for r in ratios)
    print(title)
    print(f"{'ratio':<{width}}  {'value':>7}  {'target':<8}  result")
    for r in ratios:
        value = "n/a" if r.value is None else f"{r.value:.3f}"
        verdict = "PASS" if r.passed else "FAIL"
        print(f"{r.name:<{width}}  {value:>7}  {r.target_text:<8}  {verdict}")
        for line in r.detail.splitlines():
            print(f"    {line}")
    sys.stdout.flush()


def run_agents_or_main(
    args: argparse.Namespace,
    main: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
    agents_main: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
) -> int:
    """A load benchmark's entry: ``--agents-of URL`` runs one process of agents against the
    node at URL and prints what they saw as JSON; otherwise the benchmark itself runs."""
    if args.agents_of:
        args.url = args.agents_of
        print(json.dumps(asyncio.run(agents_main(args))))
        return 0
    return asyncio.run(main(args))


class EventTally:
    """What one load agent saw of its prompts: accepted message ids and the commits naming
    them (the exactly-once accounting both load benchmarks share)."""

    def __init__(self) -> None:
        self.ids: dict[str, tuple[str, ...]] = {}
        """Idempotency key → message ids (from ``accepted``)."""
        self.accepted_at: dict[str, float] = {}
        self.parents: Counter[str] = Counter()
        """Message id → commits naming it as a parent."""
        self.turns: Counter[str] = Counter()
        """Turn id → commit events for it."""
        self.answered_at: dict[str, float] = {}
        """Message id → first commit naming it."""
        self.errors: list[dict[str, Any]] = []

    def tally(self, kind: str, body: dict[str, Any], sent: Container[str]) -> None:
        """Count an ``accepted`` event of a prompt in ``sent``, or a ``commit`` event."""
        now = time.perf_counter()
        if kind == "accepted" and body.get("idempotency_key") in sent:
            self.ids[body["idempotency_key"]] = tuple(body["message_ids"])
            self.accepted_at[body["idempotency_key"]] = now
        elif kind == "commit":
            self.turns[body["turn_id"]] += 1
            for p in body["parent_ids"]:
                self.parents[p] += 1
                self.answered_at.setdefault(p, now)


# -- connecting to a node's embedded server -----------------------------------------------
def client_env(data_dir: Path, url: str) -> dict[str, str]:
    """The environment of a child process that connects as the client user of the node
    whose embedded server wrote ``url`` into ``data_dir`` (its password never goes in argv)."""
    from node.config import NodeConfig
    from node.local_auth import client_config

    config = client_config(NodeConfig(data_dir=data_dir), url)
    env = dict(os.environ)
    if config.nats_user and config.nats_password:
        env["INFERNODE_NATS_USER"] = config.nats_user
        env["INFERNODE_NATS_PASSWORD"] = config.nats_password
    return env


async def connect_client(url: str, name: str, data_dir: Path | None = None) -> Any:
    """A NATS connection as the node's client user: from ``data_dir`` in the node's own
    process, else from the ``INFERNODE_NATS_*`` variables ``client_env`` handed down."""
    from node.bus import connect
    from node.config import NodeConfig
    from node.local_auth import client_config

    if data_dir is not None:
        return await connect(client_config(NodeConfig(data_dir=data_dir), url), url, name)
    return await connect(NodeConfig.from_env(os.environ), url, name)
