"""A stand-in for the Go ``nats`` CLI's ``req``, ``pub``, ``sub`` and ``context select``, so
README lines run verbatim.

    python -m tests.nats_cli req [--raw] [--timeout 30s] SUBJECT BODY
    python -m tests.nats_cli pub SUBJECT BODY
    python -m tests.nats_cli sub SUBJECT      # prints each message until it is ended
    python -m tests.nats_cli context select NAME

Where it connects and as whom is decided as the real CLI does: ``--server``/``-s`` (or
``NATS_URL``), ``--user`` (``NATS_USER``) and ``--password`` (``NATS_PASSWORD``) first, given
before or after the verb; then the context named by ``--context`` (``NATS_CONTEXT``), else the
selected one; else ``nats://127.0.0.1:4222`` with no user. Contexts are the CLI's files,
``$XDG_CONFIG_HOME/nats/context/NAME.json`` (``~/.config`` without that variable), and the
selection is ``nats/context.txt`` beside them. ``req`` prints the reply body on stdout; an error
reply (``Nats-Service-Error``) also prints the CLI's error line on stderr and exits 1, as
``nats req`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import nats

DEFAULT_URL = "nats://127.0.0.1:4222"


def _seconds(text: str) -> float:
    return float(text[:-1]) if text.endswith("s") else float(text)


def _config_root() -> Path:
    """The CLI's configuration directory: ``$XDG_CONFIG_HOME/nats`` or ``~/.config/nats``."""
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "nats"


def _context_path(name: str) -> Path:
    if not name or ".." in name or os.sep in name:
        raise SystemExit(f"nats: error: invalid context name {name!r}")
    return _config_root() / "context" / f"{name}.json"


def _context(name: str | None) -> dict[str, Any]:
    """The named context, else the selected one, else none (an empty one)."""
    if not name:
        selected = _config_root() / "context.txt"
        name = selected.read_text().strip() if selected.is_file() else ""
        if not name:
            return {}
    path = _context_path(name)
    if not path.is_file():
        raise SystemExit(f"nats: error: unknown context {name!r}")
    return dict(json.loads(path.read_text()))


def _connect_options(args: argparse.Namespace) -> dict[str, Any]:
    """Flags and variables first, then the context, as the real CLI resolves them."""
    ctx = _context(getattr(args, "context", None) or os.environ.get("NATS_CONTEXT"))

    def pick(flag: str, env: str, key: str) -> str | None:
        return getattr(args, flag, None) or os.environ.get(env) or ctx.get(key) or None

    options: dict[str, Any] = {"servers": pick("server", "NATS_URL", "url") or DEFAULT_URL}
    user = pick("user", "NATS_USER", "user")
    if user:
        options["user"] = user
        options["password"] = pick("password", "NATS_PASSWORD", "password") or ""
    return options


async def _main(args: argparse.Namespace) -> int:
    if args.verb == "context":
        return _select(args.name)
    nc = await nats.connect(**_connect_options(args), allow_reconnect=False)
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


def _select(name: str) -> int:
    """``nats context select NAME``: make a known context the one used by default."""
    _context(name)  # refuses an unknown one, as the CLI does
    (_config_root() / "context.txt").write_text(name)
    print(f'NATS Configuration Context "{name}"')
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


def _parser() -> argparse.ArgumentParser:
    """The CLI's verbs; its connection flags go before or after the verb, as in the real one."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-s", "--server", default=argparse.SUPPRESS)
    common.add_argument("--user", default=argparse.SUPPRESS)
    common.add_argument("--password", default=argparse.SUPPRESS)
    common.add_argument("--context", default=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(prog="nats", parents=[common])
    verbs = parser.add_subparsers(dest="verb", required=True)
    req = verbs.add_parser("req", parents=[common])
    req.add_argument("--raw", action="store_true")
    req.add_argument("--timeout", default="5s")
    for verb in (req, verbs.add_parser("pub", parents=[common])):
        verb.add_argument("subject")
        verb.add_argument("body", nargs="?", default="")
    verbs.add_parser("sub", parents=[common]).add_argument("subject")
    context = verbs.add_parser("context").add_subparsers(dest="action", required=True)
    context.add_parser("select").add_argument("name")
    return parser


def main() -> None:
    """Parse the CLI's arguments and run."""
    sys.exit(asyncio.run(_main(_parser().parse_args())))


if __name__ == "__main__":
    main()
