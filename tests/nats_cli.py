"""A stand-in for the Go ``nats`` CLI's ``req``, ``pub`` and ``sub``, so README lines run verbatim.

    python -m tests.nats_cli req [--raw] [--timeout 30s] SUBJECT BODY
    python -m tests.nats_cli pub SUBJECT BODY
    python -m tests.nats_cli sub SUBJECT      # prints each message until it is ended

The server comes from ``NATS_URL`` (as with the real CLI). ``req`` prints the reply body on
stdout; an error reply (``Nats-Service-Error``) also prints the CLI's error line on stderr
and exits 1, as ``nats req`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import nats


def _seconds(text: str) -> float:
    return float(text[:-1]) if text.endswith("s") else float(text)


async def _main(args: argparse.Namespace) -> int:
    nc = await nats.connect(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    try:
        if args.verb == "pub":
            await nc.publish(args.subject, args.body.encode())
            await nc.flush()
            return 0
        if args.verb == "sub":
            return await _subscribe(nc, args.subject)
        msg = await nc.request(args.subject, args.body.encode(), timeout=_seconds(args.timeout))
    finally:
        await nc.drain()
    sys.stdout.write(msg.data.decode() + "\n")
    headers = msg.headers or {}
    if "Nats-Service-Error" in headers:
        code = headers.get("Nats-Service-Error-Code", "")
        sys.stderr.write(f"nats: error: {code}: {headers['Nats-Service-Error']}\n")
        return 1
    return 0


async def _subscribe(nc: nats.aio.client.Client, subject: str) -> int:
    """Print each message as ``nats sub`` does (its subject, then its body) until killed."""
    count = 0

    async def show(msg: nats.aio.msg.Msg) -> None:
        nonlocal count
        count += 1
        print(f'[#{count}] Received on "{msg.subject}"\n{msg.data.decode()}\n', flush=True)

    await nc.subscribe(subject, cb=show)
    await nc.flush()
    print(f"Subscribing on {subject}", flush=True)
    await asyncio.Event().wait()  # ended by a signal, as the real CLI is
    return 0


def main() -> None:
    """Parse the CLI's arguments and run."""
    parser = argparse.ArgumentParser(prog="nats")
    parser.add_argument("verb", choices=["req", "pub", "sub"])
    parser.add_argument("--raw", action="store_true")
    parser.add_argument("--timeout", default="5s")
    parser.add_argument("subject")
    parser.add_argument("body", nargs="?", default="")
    sys.exit(asyncio.run(_main(parser.parse_args())))


if __name__ == "__main__":
    main()
