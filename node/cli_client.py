"""The client side of the ``infernode`` command: prompt, abort, sessions, history, metrics.

Each command connects with ``InfernodeClient``, prints a readable answer (or ``--json``), and
turns every failure into one sentence on stderr and a non-zero exit code: 1 for an error the
node answered with, 2 for bad input or an aborted turn, 3 when no node answered.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from nats.errors import NoRespondersError
from nats.js.errors import NoStreamResponseError
from pydantic import BaseModel

from node.bus import REACH_HINT, BusError
from node.client import InfernodeClient, TurnAborted, TurnResult
from node.cluster_view import cluster_health, cluster_metrics, cluster_sessions
from node.config import NodeConfig
from node.local_auth import URL_FILE
from node.logging import configure_logging
from schemas.admin import MetricsReply
from schemas.chat import SamplingParams
from schemas.errors import InferError
from schemas.subjects import is_session_id

DEFAULT_URL = "nats://127.0.0.1:4222"
CONNECT_TIMEOUT_S = 0.8
"""A one-shot command's first connect: an unreachable node is reported within a second."""

Command = Callable[[InfernodeClient, argparse.Namespace], Awaitable[int]]


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    """Flags every client command shares."""
    p.add_argument("--nats-url", help="NATS server (default: the one `infernode up` started)")
    p.add_argument("--data-dir", type=Path, default=None, help="data dir of `infernode up`")
    p.add_argument("--prefix", default=None, help="subject prefix (default: infer)")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the node")


def resolve_url(flag: str | None, config: NodeConfig) -> str:
    """--nats-url, else INFERNODE_NATS_URL, else the URL a local `infernode up` wrote."""
    if flag:
        return flag
    if config.nats_url:
        return config.nats_url
    written = config.data_dir / URL_FILE
    if written.is_file():
        return written.read_text().strip()
    return DEFAULT_URL


def _fail(sentence: str, code: int) -> int:
    print(f"infernode: {sentence}", file=sys.stderr)
    return code


def _bad_session(session: str) -> int | None:
    if is_session_id(session):
        return None
    return _fail(f"session id {session!r} is not valid: use 1-128 letters, digits, '_' or '-'", 2)


async def run_client_command(
    args: argparse.Namespace, command: Command, environ: Mapping[str, str]
) -> int:
    """Connect, run ``command``, and map every failure to a sentence and an exit code."""
    session = getattr(args, "session", None)
    if session is not None and (bad := _bad_session(session)) is not None:
        return bad
    config = NodeConfig.from_env(environ, data_dir=args.data_dir)
    url = resolve_url(args.nats_url, config)
    # stdout carries the answer (or JSON); only warnings, on stderr, besides it.
    configure_logging("warning", config.log_format, sys.stderr)
    try:
        async with InfernodeClient(
            url, prefix=args.prefix or config.prefix, config=config,
            connect_timeout=CONNECT_TIMEOUT_S, fail_fast=True,
        ) as c:
            return await command(c, args)
    except InferError as e:
        return _fail(f"{e.code.value} ({e.status}): {e.message}", 1)
    except TurnAborted as e:
        return _fail(str(e), 2)
    except BusError as e:
        if e.hint != REACH_HINT:
            return _fail(str(e), 3)  # NATS refused us: the sentence names the settings to fix
        return _fail(f"no node at {url}: NATS is not reachable ({e.reason}); {e.hint}", 3)
    except (NoRespondersError, NoStreamResponseError):
        # NATS answered, but nothing subscribes to the node's subjects under this prefix.
        return _fail(
            f"no node at {url}: NATS answers but no infernode serves prefix "
            f"{args.prefix or config.prefix!r}; start one with `infernode up --nats-url {url}`",
            3,
        )
    except (OSError, TimeoutError) as e:
        return _fail(f"no answer from the node at {url}: {e or type(e).__name__}", 3)


def _print_json(model: BaseModel) -> None:
    print(json.dumps(model.model_dump(mode="json"), indent=2))


# -- commands --------------------------------------------------------------------------------
async def prompt(c: InfernodeClient, args: argparse.Namespace) -> int:
    """Stream the reply's tokens, then one summary line."""
    given = (("temperature", args.temperature), ("seed", args.seed))
    sampling = SamplingParams(**{k: v for k, v in given if v is not None})
    result = TurnResult()
    async for token in c.prompt(
        args.session, args.text, sampling=sampling, max_tokens=args.max_tokens,
        timeout=args.timeout or 600.0, result=result, relay_to=args.relay_to,
        accept_relays_from=args.accept_relays_from,
    ):
        print(token.text, end="", flush=True)
    done = result.done
    if done is not None:
        u = done.usage
        generation = result.commit.generation if result.commit else "?"
        print(
            f"\n[generation {generation} | cached {u.cached_tokens} / prompt {u.prompt_tokens} "
            f"tokens | completion {u.completion_tokens} | ttft {done.timings.ttft_ms:.0f} ms | "
            f"cache {done.cache.source}]"
        )
    return 0


async def abort(c: InfernodeClient, args: argparse.Namespace) -> int:
    """Abort the running turn of a session."""
    reply = await c.abort(args.session, reason=args.reason, timeout=args.timeout or 30.0)
    if args.json:
        _print_json(reply)
    elif reply.aborted:
        print(f"aborted turn {reply.turn_id} of {reply.session}")
    else:
        print(f"{reply.session}: no turn was running")
    return 0


def _missing(nodes: tuple[str, ...]) -> int:
    """Exit code 0, or 1 with a sentence when live nodes did not answer."""
    if not nodes:
        return 0
    return _fail(f"no answer from live node(s) {', '.join(nodes)}; the rest is shown", 1)


async def sessions(c: InfernodeClient, args: argparse.Namespace) -> int:
    """One line per session of every node."""
    reply, missing = await cluster_sessions(c, timeout=args.timeout or 10.0)
    if args.json:
        _print_json(reply)
        return _missing(missing)
    if not reply.sessions:
        print("no sessions")
        return _missing(missing)
    print(f"{'session':<32} {'gen':>4} {'records':>7} {'pending':>7} {'bank':>5}  "
          f"{'node':<24} state")
    for r in reply.sessions:
        state = "busy" if r.busy else "idle"
        if r.slot is not None:
            state += f", slot {r.slot}"
        print(
            f"{r.session:<32} {r.generation:>4} {r.records:>7} {r.pending:>7} "
            f"{len(r.bank):>5}  {r.node:<24} {state}"
        )
    return _missing(missing)


async def history(c: InfernodeClient, args: argparse.Namespace) -> int:
    """The record log of one session, oldest first."""
    reply = await c.history(args.session, timeout=args.timeout or 10.0)
    if args.json:
        _print_json(reply)
        return 0
    print(f"session {reply.session}, generation {reply.generation}")
    for r in reply.records:
        text = (r.content or r.reason or "").replace("\n", " ")
        if len(text) > 90:
            text = text[:87] + "..."
        marks = {"generation": r.generation, "supersedes": r.supersedes, "status": r.status,
                 "window": "out" if r.in_window is False else None}
        extra = " ".join(f"{k}={v}" for k, v in marks.items() if v is not None)
        print(f"  {r.kind:<12} {r.role or '':<9} {extra} {text}".rstrip())
    return 0


async def metrics(c: InfernodeClient, args: argparse.Namespace) -> int:
    """Counters and gauges one per line; histograms as count, sum and estimated quantiles;
    with several nodes, each node's under a ``# node <id>`` line."""
    view = await cluster_metrics(c, timeout=args.timeout or 10.0)
    if args.json:
        _print_json(view)
        return _missing(view.missing)
    for reply in view.nodes:
        if len(view.nodes) > 1:
            print(f"# node {reply.node}")
        for line in metrics_lines(reply):
            print(line)
    return _missing(view.missing)


def metrics_lines(reply: MetricsReply) -> list[str]:
    """The readable form of a metrics reply, in the families' Prometheus names."""
    prompt = reply.value("infernode_prompt_tokens_total")
    reused = reply.value("infernode_cached_prompt_tokens_total")
    lines = [f"{'prefix hit ratio (reused / prompt tokens)':<56} "
             f"{reused / prompt if prompt else 0.0:.3f}"]
    for family in reply.families:
        if family.kind == "histogram":
            count = reply.value(f"{family.name}_count")
            total = reply.value(f"{family.name}_sum")
            qs = [(q, reply.quantile(family.name, q)) for q in (0.5, 0.9, 0.99)]
            shown = " ".join(f"p{int(q * 100)}~{v:.4g}" for q, v in qs if v is not None)
            lines.append(f"{family.name:<56} count {count:.0f} sum {total:.6g} s {shown}".rstrip())
            continue
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            name = f"{sample.name}{{{labels}}}" if labels else sample.name
            value = int(sample.value) if sample.value.is_integer() else sample.value
            lines.append(f"{name:<56} {value}")
    return lines


async def health(c: InfernodeClient, args: argparse.Namespace) -> int:
    """Exit 0 when every live node answers that it serves; one block per node. With
    ``--local``, only the node this host and data directory run (a container's check)."""
    only = None
    if args.local:
        # The node's wiring imports the engine's modules: loaded only for a --local check.
        from node.wiring import node_identity

        only = node_identity(c.config)
    view = await cluster_health(c, timeout=args.timeout or 5.0, only=only)
    if args.json:
        _print_json(view)
    else:
        for i, reply in enumerate(view.nodes):
            if i:
                print()
            for name, value in reply.model_dump(mode="json").items():
                if name != "type":
                    print(f"{name:<16} {value}")
    if any(r.status not in ("ok", "degraded") for r in view.nodes):
        return 1
    return _missing(view.missing)
