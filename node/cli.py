"""The ``infernode`` command: ``up`` runs a node; the other commands talk to one.

    infernode up                          # embedded NATS + the installed model (or the demo)
    infernode models                      # the models --model can name
    infernode prompt demo "Hello there"   # stream a reply
    infernode sessions | history S | abort S | metrics | health
    infernode demo mesh --agents 3        # a ring of agents relaying answers
    infernode openai --port 8000          # the OpenAI chat completions API for a node
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import structlog

from node import cli_client, cli_gateway
from node.config import ConfigError, NodeConfig
from node.logging import configure_logging
from node.nats_server import DEFAULT_PORT as DEFAULT_NATS_PORT

log = structlog.get_logger("cli")

# Flags of `up` and the NodeConfig field each one sets.
UP_FLAGS: dict[str, str] = {
    "--nats-url": "nats_url",
    "--nats-port": "nats_port",
    "--model": "model",
    "--engine": "engine",
    "--data-dir": "data_dir",
    "--prefix": "prefix",
    "--slots": "n_slots",
    "--ctx": "n_ctx",
    "--threads": "threads",
    "--batch": "n_batch",
    "--gpu-layers": "gpu_layers",
    "--llama-lib": "llama_lib",
    "--chat-template": "chat_template",
    "--overflow": "overflow",
    "--speculate": "speculate",
    "--flash-attn": "flash_attn",
    "--bank-ram-bytes": "bank_ram_bytes",
    "--bank-session-bytes": "bank_session_bytes",
    "--commit-wait-s": "commit_wait_s",
    "--bank-dir": "bank_dir",
    "--bank-object-store": "bank_object_store",
    "--bank-durable-bytes": "bank_durable_bytes",
    "--bank-share-groups": "bank_share_groups",
    "--metrics-port": "metrics_port",
    "--metrics-host": "metrics_host",
    "--max-pending": "max_pending_per_session",
    "--max-pending-bytes": "max_pending_bytes",
    "--max-session-bytes": "max_session_bytes",
    "--max-node-bytes": "max_node_bytes",
    "--max-sessions": "max_sessions",
    "--tombstones": "tombstones",
    "--intake-max-prompts": "intake_max_prompts",
    "--intake-max-bytes": "intake_max_bytes",
    "--records-max-age": "records_max_age",
    "--records-max-bytes": "records_max_bytes",
    "--heartbeat-s": "heartbeat_s",
    "--node-id": "node_id",
    "--partitions": "partitions",
    "--lease-ttl-s": "lease_ttl_s",
    "--replicas": "replicas",
    "--no-balance": "balance",
    "--log-level": "log_level",
    "--log-format": "log_format",
    "--llama-log": "llama_log",
    "--openai-port": "openai_port",
    "--openai-host": "openai_host",
    "--api-keys": "api_keys",
    "--openai-max-body-bytes": "openai_max_body_bytes",
    "--openai-max-requests": "openai_max_requests",
    "--openai-header-timeout-s": "openai_header_timeout_s",
    "--openai-max-connections": "openai_max_connections",
    "--openai-max-connections-per-client": "openai_max_connections_per_client",
}


def _up_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("up", help="run a node (embedded NATS and the installed model by default)")
    p.add_argument("--nats-url", help="join this NATS server instead of starting one")
    p.add_argument("--nats-port", type=int, help="port of the embedded NATS server (default "
                   "4222, or a free one when 4222 is in use; 0 = any free port)")
    p.add_argument("--model", type=Path, help="GGUF file or model name (see `infernode models`; "
                   "default: the installed one, else a random-weight demo)")
    p.add_argument("--engine", help="auto (default), llama-cpp or ctransformers")
    p.add_argument("--data-dir", type=Path, help="where NATS data and the demo model live")
    p.add_argument("--prefix", help="subject prefix (default: infer)")
    p.add_argument("--slots", type=int, dest="n_slots", help="contexts sharing the model")
    p.add_argument("--ctx", type=int, dest="n_ctx", help="context length of each slot "
                   "(0 = the model's trained context, as far as memory allows; the default)")
    p.add_argument("--threads", type=int, help="CPU threads per evaluation "
                   "(0 = the idle cores, decided per evaluation; the default)")
    p.add_argument("--gpu-layers", type=int, help="layers offloaded to CUDA (0 = CPU only)")
    p.add_argument("--llama-lib", type=Path, help="a llama.cpp library built from the sdist")
    p.add_argument("--chat-template", help="auto, gguf, chatml, llama-2, mistral, llama-3, "
                   "gemma, phi-3, or a .jinja file")
    p.add_argument("--flash-attn", help="auto (default: on where llama.cpp supports it), on or off "
                   "(llama-cpp engine)")
    p.add_argument(
        "--overflow", help="truncate (default), shift or refuse: a session outgrowing --ctx"
    )
    p.add_argument("--speculate", help="auto (default: on with a GPU, off on a CPU), on or off: "
                   "verify tokens proposed by n-gram lookup in the context (llama-cpp engine)")
    p.add_argument("--bank-ram-bytes", type=int, help="host RAM for KV snapshots (0 = off)")
    p.add_argument("--bank-session-bytes", type=int, help="RAM bank cap of one session")
    p.add_argument("--commit-wait-s", type=float,
                   help="longest wait for a slot to go idle before its snapshot (default 30)")
    p.add_argument("--bank-dir", type=Path, help="durable bank tier in this directory")
    p.add_argument("--bank-object-store", action="store_const", const=True,
                   help="durable bank tier in a JetStream object store")
    p.add_argument("--bank-durable-bytes", type=int,
                   help="durable bank cap; least recently used snapshots go (0 = no cap)")
    p.add_argument("--bank-share-groups", metavar="NAME=PATTERN[,PATTERN][;...]",
                   help="sessions or agents that share KV prefixes (default: each agent alone)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus text on this port")
    p.add_argument("--metrics-host", help="address of the metrics port (default 127.0.0.1)")
    p.add_argument("--batch", type=int, dest="n_batch", help="prompt tokens per evaluation "
                   "(0 = the engine's own: 2048 on llama-cpp, 512 on ctransformers)")
    p.add_argument("--max-pending", type=int, dest="max_pending_per_session",
                   help="prompts a session may have waiting before busy (429)")
    p.add_argument("--max-pending-bytes", type=int,
                   help="bytes a session may have waiting before busy (429)")
    p.add_argument("--max-session-bytes", type=int,
                   help="bytes a session may record before too_large (413)")
    p.add_argument("--max-node-bytes", type=int,
                   help="bytes all sessions of the node may hold before busy (429)")
    p.add_argument("--max-sessions", type=int, help="sessions held before busy (429)")
    p.add_argument("--tombstones", type=int, help="deleted session ids remembered (410)")
    p.add_argument("--intake-max-prompts", type=int,
                   help="prompts the intake stream holds before publishes are refused")
    p.add_argument("--intake-max-bytes", type=int, help="bytes the intake stream holds")
    p.add_argument("--records-max-age", type=float,
                   help="seconds records are kept in the record stream (0 = for ever)")
    p.add_argument("--records-max-bytes", type=int,
                   help="bytes the record stream holds, oldest dropped first (0 = unlimited)")
    p.add_argument("--heartbeat-s", type=float, help="seconds between stats log lines")
    p.add_argument("--node-id", help="this node's name on the NATS (default: host name and "
                   "a hash of the data dir)")
    p.add_argument("--partitions", type=int,
                   help="partitions sessions are spread over (the same on every node)")
    p.add_argument("--lease-ttl-s", type=float,
                   help="seconds a partition lease lasts unless renewed (default 10)")
    p.add_argument("--replicas", type=int, help="copies of each stream and bucket on the "
                   "servers of a NATS cluster (default 1)")
    p.add_argument("--no-balance", dest="balance", action="store_const", const=False,
                   help="take every free partition and hand none over to nodes that join")
    p.add_argument("--log-level", help="debug, info, warning or error")
    p.add_argument("--log-format", help="auto, json or console")
    p.add_argument("--llama-log", action="store_const", const=True, help="show llama.cpp's log")
    p.add_argument("--openai-port", type=int,
                   help="serve the OpenAI chat completions API on this port")
    p.add_argument("--openai-host", help="address of the OpenAI port (default 127.0.0.1)")
    p.add_argument("--api-keys", type=Path, help="file of `KEY AGENT` lines for the OpenAI API")
    p.add_argument("--openai-max-body-bytes", type=int, help="largest OpenAI request body")
    p.add_argument("--openai-max-requests", type=int,
                   help="OpenAI requests at once before 429")
    p.add_argument("--openai-header-timeout-s", type=float,
                   help="seconds a connection has to send its request headers")
    p.add_argument("--openai-max-connections", type=int,
                   help="open OpenAI connections in all (idle ones make room; 503 past it)")
    p.add_argument("--openai-max-connections-per-client", type=int,
                   help="open OpenAI connections per client address (idle ones make room; "
                   "429 past it)")
    p.add_argument("--demo-agents", type=int, default=0,
                   help="also run a ring of N agents relaying to each other, then keep serving")


def _client_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("models", help="the models --model can name, and which are installed")
    p.set_defaults(command_fn=None)

    p = sub.add_parser("prompt", help="send a prompt and stream the answer")
    p.add_argument("session", help="session id (letters, digits, '_' or '-')")
    p.add_argument("text", help="the user message")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--relay-to", default=None, help="send the answer on to this session")
    p.add_argument("--accept-relays-from", action="append", default=None, metavar="OTHER",
                   help="let OTHER's relayed answers into this session (repeat for more)")
    cli_client.add_connection_flags(p)
    p.set_defaults(command_fn=cli_client.prompt)

    p = sub.add_parser("abort", help="abort a session's running turn")
    p.add_argument("session")
    p.add_argument("--reason", default="client")
    p.add_argument("--json", action="store_true")
    cli_client.add_connection_flags(p)
    p.set_defaults(command_fn=cli_client.abort)

    p = sub.add_parser("history", help="a session's record log")
    p.add_argument("session")
    p.add_argument("--json", action="store_true")
    cli_client.add_connection_flags(p)
    p.set_defaults(command_fn=cli_client.history)

    for name, fn, text in (
        ("sessions", cli_client.sessions, "every session of every node"),
        ("metrics", cli_client.metrics, "counters and latencies of every node"),
        ("health", cli_client.health, "exit 0 when every node serves"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true")
        if name == "health":
            p.add_argument("--local", action="store_true",
                           help="only the node this host and --data-dir run (a healthcheck)")
        cli_client.add_connection_flags(p)
        p.set_defaults(command_fn=fn)

    demo = sub.add_parser("demo", help="demonstrations against a running node")
    demo_sub = demo.add_subparsers(dest="demo", required=True)
    p = demo_sub.add_parser("mesh", help="a ring of agents relaying answers to each other")
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=24)
    cli_client.add_connection_flags(p)
    p.set_defaults(command_fn=_mesh)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="infernode", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _up_parser(sub)
    _client_parsers(sub)
    cli_gateway.add_parser(sub)
    return parser


async def _mesh(client: cli_client.InfernodeClient, args: argparse.Namespace) -> int:
    from node.mesh import run_mesh

    if args.agents < 2:
        print("infernode: a mesh needs at least 2 agents", file=sys.stderr)
        return 2
    report = await run_mesh(client, args.agents, args.rounds, max_tokens=args.max_tokens)
    print(f"[{report.hops} hops, {len(report.answers)} answers]")
    return 0


class Say:
    """What `up` tells its user: plain lines on a terminal, structlog events in JSON mode.

    In JSON mode every line on stdout and stderr is one JSON object, so a log shipper (or
    compose's log driver) never meets a plain line.
    """

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def __call__(
        self, event: str, text: str, *, stream: TextIO | None = None, level: str = "info",
        **fields: object,
    ) -> None:
        """Print ``text`` (to ``stream``, stderr by default), or log ``event`` with ``fields``."""
        if self.as_json:
            getattr(log, level)(event, **fields)
        else:
            print(text, file=stream or sys.stderr, flush=True)


def load_progress(say: Say, stream: TextIO = sys.stderr) -> Callable[[float], None]:
    """A progress bar on a terminal; a line (or a JSON event) per quarter otherwise."""
    tty = stream.isatty() and not say.as_json
    shown = {"last": -1}

    def report(fraction: float) -> None:
        pct = int(max(0.0, min(1.0, fraction)) * 100)
        if tty:
            if pct != shown["last"]:
                bar = "#" * (pct // 4) + "-" * (25 - pct // 4)
                end = "\n" if pct >= 100 else ""
                print(f"\rinfernode: loading model [{bar}] {pct:3d}%", end=end, file=stream,
                      flush=True)
        elif pct // 25 != shown["last"] // 25 or shown["last"] < 0:
            say("model_loading", f"infernode: loading model {pct}%", stream=stream, percent=pct)
        shown["last"] = pct

    return report


async def _up(args: argparse.Namespace) -> int:
    from node.app import Node, StartError

    overrides = {field: getattr(args, field) for field in UP_FLAGS.values()}
    config = NodeConfig.from_env(os.environ, **overrides)
    if config.nats_port is None:  # NATS's own default, where `nats` commands look first
        config = replace(config, nats_port=DEFAULT_NATS_PORT)
    say = Say(configure_logging(config.log_level, config.log_format))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = Node(config, on_load_progress=load_progress(say))
    say("node_starting", "infernode: starting (loading the model)...")
    try:
        await node.start()
    except StartError as e:
        say("start_failed", f"infernode: cannot start: {e}", level="error", error=str(e))
        return 1
    try:
        _say_ready(say, node)
        if args.demo_agents:
            await _demo_agents(node, args.demo_agents, stop, say)
        await stop.wait()
        say("node_stopping", "infernode: stopping...")
    finally:
        await node.stop()
    return 0


def _say_ready(say: Say, node) -> None:  # type: ignore[no-untyped-def]
    config = node.config
    model = node.model
    demo = f"  [{model.label}]" if model is not None else ""
    hint = "" if config.nats_url else f" --nats-url {node.url}"
    try_command = f'infernode prompt demo "Hello there"{hint}'
    metrics = openai = None
    if node.metrics_http is not None:
        metrics = f"http://{config.metrics_host}:{node.metrics_http.port}/metrics"
    if node.gateway is not None:
        openai = f"http://{config.openai_host}:{node.gateway.port}/v1"
    if say.as_json:
        log.info("up_ready", nats=node.url, demo_model=model is not None and model.demo,
                 model=model.label if model is not None else None,
                 try_command=try_command, metrics=metrics, openai=openai)
        return
    taken = node.nats.port_taken if node.nats is not None else None
    if taken is not None:
        print(f"infernode: port {taken} is in use, so the embedded nats-server picked another "
              f"port: give clients {node.url} (--nats-url, or NATS_URL for the nats CLI)",
              file=sys.stderr, flush=True)
    print(f"infernode: ready on {node.url}{demo}", flush=True)
    print(f"  try:  {try_command}", flush=True)
    if metrics is not None:
        print(f"  metrics: {metrics}", flush=True)
    if openai is not None:
        print(f"  OpenAI API: {openai}", flush=True)


async def _demo_agents(  # type: ignore[no-untyped-def]
    node, agents: int, stop: asyncio.Event, say: Say
) -> None:
    from node.client import InfernodeClient
    from node.mesh import run_mesh

    async with InfernodeClient(node.url, prefix=node.config.prefix, config=node.config) as c:
        def line(text: str) -> None:
            say("demo_mesh", text, stream=sys.stdout, line=text)

        mesh = asyncio.ensure_future(run_mesh(c, max(agents, 2), rounds=1, say=line))
        halt = asyncio.ensure_future(stop.wait())
        await asyncio.wait({mesh, halt}, return_when=asyncio.FIRST_COMPLETED)
        if not mesh.done():
            mesh.cancel()
        halt.cancel()
        if mesh.done() and not mesh.cancelled() and mesh.exception() is not None:
            say("demo_mesh_failed", f"infernode: demo mesh failed: {mesh.exception()}",
                level="error", error=str(mesh.exception()))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infernode`` script."""
    args = build_parser().parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional on platforms without it
        pass
    try:
        if args.command == "up":
            return asyncio.run(_up(args))
        if args.command == "openai":
            return asyncio.run(cli_gateway.run(args, os.environ))
        if args.command == "models":
            from node.models import listing

            print("\n".join(listing()))
            return 0
        return asyncio.run(cli_client.run_client_command(args, args.command_fn, os.environ))
    except ConfigError as e:
        print(f"infernode: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
