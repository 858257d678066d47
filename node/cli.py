"""The ``infernode`` command: ``up`` runs a node, ``prompt`` talks to one.

    infernode up                          # embedded NATS + demo model
    infernode prompt demo "Hello there"   # stream a reply
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from node.config import ConfigError, NodeConfig
from node.logging import configure_logging

DEFAULT_URL = "nats://127.0.0.1:4222"


def _up_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("up", help="run a node (embedded NATS and the demo model by default)")
    p.add_argument("--nats-url", help="join this NATS server instead of starting one")
    p.add_argument("--model", type=Path, help="GGUF model file (default: a random-weight demo)")
    p.add_argument("--data-dir", type=Path, help="where NATS data and the demo model live")
    p.add_argument("--prefix", help="subject prefix (default: infer)")
    p.add_argument("--slots", type=int, dest="n_slots", help="contexts sharing the model")
    p.add_argument("--ctx", type=int, dest="n_ctx", help="context length of each slot")
    p.add_argument("--threads", type=int, help="CPU threads per evaluation (0 = all)")
    p.add_argument("--gpu-layers", type=int, help="layers offloaded to CUDA (0 = CPU only)")
    p.add_argument("--llama-lib", type=Path, help="a llama.cpp library built from the sdist")
    p.add_argument("--chat-template", help="auto, gguf, chatml, llama-2 or mistral")
    p.add_argument("--bank-ram-bytes", type=int, help="host RAM for KV snapshots (0 = off)")
    p.add_argument("--log-level", help="debug, info, warning or error")
    p.add_argument("--log-format", help="auto, json or console")
    p.add_argument("--llama-log", action="store_const", const=True, help="show llama.cpp's log")


def _prompt_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("prompt", help="send a prompt and stream the answer")
    p.add_argument("session", help="session id (letters, digits, '_' or '-')")
    p.add_argument("text", help="the user message")
    p.add_argument("--nats-url", help="NATS server (default: the one `infernode up` started)")
    p.add_argument("--data-dir", type=Path, default=None, help="data dir of `infernode up`")
    p.add_argument("--prefix", default=None, help="subject prefix (default: infer)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="infernode", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _up_parser(sub)
    _prompt_parser(sub)
    return parser


def resolve_url(flag: str | None, data_dir: Path | None) -> str:
    """--nats-url, else INFERNODE_NATS_URL, else the URL a local `infernode up` wrote."""
    config = NodeConfig.from_env(os.environ, data_dir=data_dir)
    if flag:
        return flag
    if config.nats_url:
        return config.nats_url
    written = config.data_dir / "nats.url"
    if written.is_file():
        return written.read_text().strip()
    return DEFAULT_URL


async def _up(args: argparse.Namespace) -> int:
    from node.app import Node

    keys = ("nats_url", "model", "data_dir", "prefix", "n_slots", "n_ctx", "threads",
            "gpu_layers", "llama_lib", "chat_template", "bank_ram_bytes", "log_level",
            "log_format", "llama_log")
    config = NodeConfig.from_env(os.environ, **{k: getattr(args, k) for k in keys})
    configure_logging(config.log_level, config.log_format)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = Node(config)
    print("infernode: starting (loading the model)...", file=sys.stderr, flush=True)
    await node.start()
    try:
        demo = "" if config.model else "  [demo model: random weights, wiring only]"
        print(f"infernode: ready on {node.url}{demo}", flush=True)
        print(f'  try:  infernode prompt demo "Hello there" --nats-url {node.url}', flush=True)
        await stop.wait()
        print("infernode: stopping...", file=sys.stderr, flush=True)
    finally:
        await node.stop()
    return 0


async def _prompt(args: argparse.Namespace) -> int:
    from node.bus import BusError
    from node.client import InfernodeClient, TurnAborted, TurnResult
    from schemas.subjects import is_session_id
    from schemas.chat import SamplingParams
    from schemas.errors import InferError

    if not is_session_id(args.session):
        print(
            f"infernode: session id {args.session!r} is not valid: "
            "use 1-128 letters, digits, '_' or '-'",
            file=sys.stderr,
        )
        return 2
    url = resolve_url(args.nats_url, args.data_dir)
    sampling = SamplingParams(
        **{k: v for k, v in (("temperature", args.temperature), ("seed", args.seed)) if v is not None}
    )
    result = TurnResult()
    try:
        config = NodeConfig.from_env(os.environ)
        prefix = args.prefix or config.prefix
        async with InfernodeClient(url, prefix=prefix, config=config) as client:
            async for token in client.prompt(
                args.session, args.text, sampling=sampling, max_tokens=args.max_tokens,
                timeout=args.timeout, result=result,
            ):
                print(token.text, end="", flush=True)
    except InferError as e:
        print(f"\ninfernode: {e.code.value} ({e.status}): {e.message}", file=sys.stderr)
        return 1
    except TurnAborted as e:
        print(f"\ninfernode: {e}", file=sys.stderr)
        return 2
    except BusError as e:
        print(f"infernode: {e}", file=sys.stderr)
        return 3
    except (OSError, TimeoutError) as e:
        print(f"\ninfernode: no answer from the node at {url}: {e or type(e).__name__}",
              file=sys.stderr)
        return 3
    done = result.done
    if done is not None:
        u = done.usage
        print(
            f"\n[generation {result.commit.generation if result.commit else '?'} | "
            f"cached {u.cached_tokens} / prompt {u.prompt_tokens} tokens | "
            f"completion {u.completion_tokens} | ttft {done.timings.ttft_ms:.0f} ms | "
            f"cache {done.cache.source}]"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infernode`` script."""
    args = build_parser().parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional on platforms without it
        pass
    try:
        runner = _up if args.command == "up" else _prompt
        return asyncio.run(runner(args))
    except ConfigError as e:
        print(f"infernode: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
