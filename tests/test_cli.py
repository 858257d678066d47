"""The command line, run as real subprocesses: `infernode up`, `infernode prompt`, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import LineReader, stop_child
from tests.support.node_process import READY, cli_argv


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
    environ["INFERNODE_DATA_DIR"] = str(tmp_path / "data")
    environ["INFERNODE_THREADS"] = "1"
    # The CLI's wiring runs on the demo model, fast anywhere; tests/test_models.py starts
    # `up` on the installed real model.
    environ["INFERNODE_MODEL"] = "demo"
    return environ


def test_up_serves_a_prompt_from_the_cli_and_stops_on_sigterm_with_exit_0(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Given `infernode up` with no flags, `infernode prompt` streams an answer; SIGTERM exits 0."""
    up = subprocess.Popen(
        cli_argv("up"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out = LineReader(up.stdout)
        ready = json.loads(out.wait_for(READY, timeout=90).string)
        url = ready["nats"]
        assert ready["try_command"].startswith("infernode prompt ") and url in ready["try_command"]

        # No --nats-url: the prompt command finds the node through the data dir it wrote.
        prompt = subprocess.run(
            cli_argv(
                "prompt", "cli-demo", "Hello there", "--max-tokens", "8", "--temperature", "0"
            ),
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert prompt.returncode == 0, prompt.stderr
        assert re.search(r"\[generation 1 \| cached \d+ / prompt \d+ tokens \| completion \d+",
                         prompt.stdout), prompt.stdout
        streamed = prompt.stdout.split("\n[generation")[0]
        assert streamed.strip(), "no tokens were streamed"

        again = subprocess.run(
            cli_argv("prompt", "cli-demo", "And again", "--max-tokens", "4", "--nats-url", url),
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert again.returncode == 0, again.stderr
        cached = re.search(r"\[generation 2 \| cached (\d+) / prompt", again.stdout)
        assert cached and int(cached.group(1)) > 0, again.stdout

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    finally:
        stop_child(up)


def test_prompt_without_a_node_says_so_and_exits_nonzero(env: dict[str, str]) -> None:
    """Given no node, `infernode prompt` prints a readable sentence, not a traceback."""
    done = subprocess.run(
        cli_argv("prompt", "s1", "hi", "--nats-url", "nats://127.0.0.1:1", "--timeout", "5"),
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "nats://127.0.0.1:1" in done.stderr


def test_invalid_session_id_on_the_cli_is_a_readable_error(env: dict[str, str]) -> None:
    """Given a session id that is not one subject token, the CLI refuses it before sending."""
    done = subprocess.run(
        cli_argv("prompt", "bad.id", "hi", "--nats-url", "nats://127.0.0.1:1"),
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "bad.id" in done.stderr


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def own_logging():  # type: ignore[no-untyped-def]
    """Put back the logging configuration an in-process command replaces (it is global)."""
    import logging

    import structlog

    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


async def _health_exit(url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    import asyncio

    from node import cli_client
    from node.cli import build_parser

    args = build_parser().parse_args(["health", "--nats-url", url])
    # The deadline is the behaviour under test: a dead address must not wait out a retry loop.
    code = await asyncio.wait_for(
        cli_client.run_client_command(args, args.command_fn, {}), timeout=1.0
    )
    return code, capsys.readouterr().err


async def test_client_command_reports_no_node_within_a_second_when_nothing_listens(
    capsys, own_logging
):
    """Given a URL where nothing listens, `health` says "no node at URL" and exits 3 within 1 s."""
    url = f"nats://127.0.0.1:{_closed_port()}"
    code, err = await _health_exit(url, capsys)
    assert code == 3
    assert f"no node at {url}" in err and "not reachable" in err


async def test_client_command_reports_no_node_when_nats_runs_without_a_node(
    nats_server, capsys, own_logging
):
    """Given a NATS server with no infernode on it, `health` says "no node at URL" and exits 3."""
    code, err = await _health_exit(nats_server.url, capsys)
    assert code == 3
    assert f"no node at {nats_server.url}" in err and "no infernode serves" in err


def test_prompt_without_a_node_on_a_running_nats_exits_3_without_a_traceback(
    env: dict[str, str], tmp_path: Path
) -> None:
    """Given NATS but no node, `infernode prompt` exits 3 with a sentence, not a traceback."""
    import asyncio

    from node.nats_server import EmbeddedNats

    async def run() -> subprocess.CompletedProcess[str]:
        async with EmbeddedNats(tmp_path / "nats") as server:
            return await asyncio.to_thread(
                subprocess.run, cli_argv("prompt", "s1", "hi", "--nats-url", server.url),
                env=env, capture_output=True, text=True, timeout=60,
            )

    done = asyncio.run(run())
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and "no node at nats://" in done.stderr


def test_up_in_json_mode_writes_only_json_objects_on_stdout_and_stderr(
    env: dict[str, str]
) -> None:
    """Given `up --log-format json`, every line of both streams is one JSON object, progress too."""
    up = subprocess.Popen(cli_argv("up", "--log-format", "json", "--demo-agents", "2"), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        err, out = LineReader(up.stderr), LineReader(up.stdout)
        err.wait_for(READY, timeout=90)
        err.wait_for(re.compile(r'"event": "demo_mesh"'), timeout=90)  # the mesh's lines
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        err.wait_for(re.compile(r'"event": "node_stopped"'), timeout=10)
    finally:
        stop_child(up)
    events = [json.loads(line) for line in err.seen + out.seen]  # fails on any plain line
    assert all(isinstance(e, dict) and "event" in e for e in events)
    names = [e["event"] for e in events]
    assert {"node_starting", "model_loading", "up_ready", "node_stopping"} <= set(names)
    assert [e["percent"] for e in events if e["event"] == "model_loading"][-1] == 100


async def test_client_library_never_prints_to_the_host_programs_stdout(
    make_node, env: dict[str, str]
) -> None:
    """Given a program that embeds InfernodeClient without configuring logging, its stdout holds
    only what it printed; with logging configured, the client's events reach that logging."""
    program = (
        "import asyncio, logging, sys\n"
        "from node.client import InfernodeClient\n"
        "if sys.argv[2] == 'debug':\n"
        "    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)\n"
        "async def main():\n"
        "    async with InfernodeClient(sys.argv[1]) as c:\n"
        "        print((await c.health()).status)\n"
        "asyncio.run(main())\n"
    )
    import asyncio

    node = await make_node()
    quiet, debug = [
        await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", program, node.url, mode], env=env,
            capture_output=True, text=True, timeout=60,
        )
        for mode in ("quiet", "debug")
    ]
    assert quiet.returncode == 0 and debug.returncode == 0, quiet.stderr + debug.stderr
    assert quiet.stdout == "ok\n" and debug.stdout == "ok\n"
    assert quiet.stderr == ""
    assert "nats_connected" in debug.stderr and "infernode.bus" in debug.stderr
