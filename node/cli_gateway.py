"""``infernode openai``: the OpenAI-compatible gateway on its own, next to a running node.

    infernode openai --nats-url nats://127.0.0.1:4222 --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from actors.gateway import ApiKeysError, Gateway, GatewayBindError
from actors.replicas import ReplicasError
from node.bus import BusError, connect
from node.cli_client import resolve_url
from node.config import NodeConfig
from node.local_auth import gateway_config
from node.logging import configure_logging
from schemas.subjects import Subjects


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``openai`` command."""
    p = sub.add_parser("openai", help="serve the OpenAI chat completions API for a node")
    p.add_argument("--nats-url", help="NATS server of the node (default: the local one)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--host", default=None, help="address (default 127.0.0.1)")
    p.add_argument("--api-keys", type=Path, default=None,
                   help="file of `KEY AGENT` lines; required beyond loopback")
    p.add_argument("--data-dir", type=Path, default=None, help="data dir of `infernode up`")
    p.add_argument("--prefix", default=None, help="subject prefix (default: infer)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections in all (default 2048; idle ones make room)")
    p.add_argument("--max-connections-per-client", type=int, default=None,
                   help="open connections per client address (default 256; its idle ones "
                   "make room)")
    p.set_defaults(command_fn=None)


async def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Serve until SIGINT or SIGTERM."""
    from node.wiring import gateway_settings

    config = NodeConfig.from_env(
        environ, data_dir=args.data_dir, prefix=args.prefix, api_keys=args.api_keys,
        openai_host=args.host, openai_max_connections=args.max_connections,
        openai_max_connections_per_client=args.max_connections_per_client,
    )
    configure_logging(config.log_level, config.log_format)
    url = resolve_url(args.nats_url, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        settings = gateway_settings(config, args.port, config.openai_host)
        # On the local embedded server, as the node's own user (the index lives in JetStream).
        nc = await connect(gateway_config(config, url), url, "infernode-gateway")
    except (ApiKeysError, GatewayBindError, BusError) as e:
        print(f"infernode: {e}", file=sys.stderr)
        return 2 if not isinstance(e, BusError) else 3
    try:
        gateway = Gateway(nc, Subjects(config.prefix), settings)
        try:
            await gateway.start()
        except OSError as e:
            print(f"infernode: cannot listen on {config.openai_host}:{args.port}: "
                  f"{e.strerror}", file=sys.stderr)
            return 1
        except ReplicasError as e:
            print(f"infernode: {e}", file=sys.stderr)
            return 2
        print(f"infernode: OpenAI API on http://{config.openai_host}:{gateway.port}/v1 "
              f"(node at {url})", flush=True)
        await stop.wait()
        await gateway.stop()
    finally:
        await nc.drain()
    return 0
