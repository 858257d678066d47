"""A stand-in for the `nats` CLI's `sub`, `pub` and `req`, for machines without it.

The README's `nats` lines run verbatim in tests/test_readme.py: with the real CLI when it is
on the PATH, else with this script under the name `nats`. It speaks the same defaults
(`--server`, else `NATS_URL`, else nats://127.0.0.1:4222) and prints what the CLI prints in
substance: each received message's subject and body, or the reply's body.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import nats


async def main() -> int:
    parser = argparse.ArgumentParser(prog="nats")
    parser.add_argument("--server", "-s", default=os.environ.get("NATS_URL",
                                                                  "nats://127.0.0.1:4222"))
    parser.add_argument("verb", choices=("sub", "pub", "req"))
    parser.add_argument("subject")
    parser.add_argument("body", nargs="?", default="")
    args = parser.parse_args()
    nc = await nats.connect(args.server, connect_timeout=2, max_reconnect_attempts=0)
    try:
        if args.verb == "pub":
            await nc.publish(args.subject, args.body.encode())
            await nc.flush()
            print(f'Published {len(args.body)} bytes to "{args.subject}"', flush=True)
        elif args.verb == "req":
            reply = await nc.request(args.subject, args.body.encode(), timeout=10)
            print(reply.data.decode(), flush=True)
        else:
            count = 0

            async def show(msg: nats.aio.msg.Msg) -> None:
                nonlocal count
                count += 1
                print(f'[#{count}] Received on "{msg.subject}"\n{msg.data.decode()}\n', flush=True)

            await nc.subscribe(args.subject, cb=show)
            await nc.flush()
            print(f'Subscribing on {args.subject}', flush=True)
            await asyncio.Event().wait()  # until the shell that started it ends it
    finally:
        await nc.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
