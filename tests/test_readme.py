"""The README's commands and its Python example, run verbatim against a node started its way.

The node is `infernode up` with no flags, in a fresh directory: it listens on 4222, where the
README's `nats` lines (through the context the README selects) and the example connect
without being told a URL or a password. Lines that install, build or need Docker or CUDA
are left to the places that can run them (listed below).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.nats_server import DEFAULT_PORT
from schemas.messages import PromptRequest
from tests.helpers import LineReader, stop_child

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

NOT_HERE = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test,smollm2]' && infernode up":
        "the install is .ci/run's own first step; `infernode up` is how the node here starts",
    "python -m pytest -q": "this is that run (tests/test_docs.py checks CI runs it)",
}
NOT_HERE_SECTIONS = {
    "Running with compose": "needs Docker; tests/test_compose.py runs each service's command",
    "CUDA": "needs a CUDA GPU and a compiler",
    "A 3-server NATS cluster": "needs Docker; tests/test_compose_cluster.py runs each "
    "service's command of compose.cluster.yaml",
    "OpenAI-compatible API": "tests/test_gateway_docs.py runs its curl lines and SDK examples "
    "against a gateway on a free port",
}
if "tools" not in PromptRequest.model_fields:  # as tests/test_docs.py skips it
    NOT_HERE_SECTIONS["An agent loop with tools"] = "prompts do not accept tools in this build"


def _sections() -> Iterator[tuple[str, str, str]]:
    """(heading, language, code) of every fenced block, under its nearest heading."""
    heading = ""
    for part in re.split(r"(^#+ [^\n]*$|^```\w*\n.*?^```$)", README, flags=re.M | re.S):
        if part.startswith("#"):
            heading = part.lstrip("#").strip()
        elif part.startswith("```"):
            lang, _, body = part[3:].partition("\n")
            yield heading, lang, body.rsplit("```", 1)[0]


def shell_blocks() -> list[tuple[str, str]]:
    """The README's bash blocks to run: (heading, script), without the lines run elsewhere.

    A block that is one `nats sub` line runs "in one terminal": it is started, and the
    blocks after it run while it listens.
    """
    out = []
    for heading, lang, code in _sections():
        if lang != "bash" or any(s in heading for s in NOT_HERE_SECTIONS):
            continue
        lines = [line for line in code.splitlines() if line.strip() not in NOT_HERE]
        if lines:
            out.append((heading, "\n".join(lines) + "\n"))
    return out


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def readme_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user's shell: the project's scripts on PATH, `nats` too."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("INFERNODE_", "NATS_")) and k != "XDG_CONFIG_HOME"}
    env["INFERNODE_THREADS"] = "1"  # the test machine's cores are shared
    # A home of its own: the README's `nats context` lines write into ~/.config/nats.
    env["HOME"] = str(tmp_path / "home")
    tools = tmp_path / "bin"
    tools.mkdir()
    if not _on_path("nats", env):
        # The real `nats` CLI is a Go program not on every machine; the stand-in speaks its
        # sub/pub/req with the same defaults (tests/nats_cli.py).
        shim = tools / "nats"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tests.nats_cli "$@"\n')
        shim.chmod(0o755)
    env["PATH"] = os.pathsep.join([str(tools), str(Path(sys.executable).parent), env["PATH"]])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _on_path(name: str, env: dict[str, str]) -> bool:
    import shutil

    return shutil.which(name, path=env.get("PATH")) is not None


def _run_block(script: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run a block as a user pastes it into a shell; its exit status and output."""
    done = subprocess.run(["bash", "-e", "-c", script], env=env, cwd=cwd, text=True,
                          capture_output=True, timeout=240)
    return done.returncode, done.stdout + done.stderr


def _watch(script: str, env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], LineReader]:
    """Start a block that runs until stopped (`nats sub`, "in one terminal") and wait until
    it listens."""
    proc = subprocess.Popen(["bash", "-e", "-c", script], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out = LineReader(proc.stdout)
    out.wait_for(re.compile("Subscribing on"), timeout=30)
    return proc, out


@pytest.mark.timeout(600)
def test_readme_shell_lines_and_python_example_run_verbatim(readme_env, tmp_path):
    """Given `infernode up` as the README starts it, each README shell block and each Python
    example exits 0 (tests/test_docs.py checks what each prints)."""
    if not _port_free(DEFAULT_PORT):
        pytest.skip(f"port {DEFAULT_PORT} is in use on this machine; the README's lines use it")
    up = subprocess.Popen(["infernode", "up"], env=readme_env, cwd=tmp_path, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ready = json.loads(LineReader(up.stdout).wait_for(re.compile('"up_ready"'), 120).string)
        assert ready["nats"] == f"nats://127.0.0.1:{DEFAULT_PORT}"
        blocks = shell_blocks()
        assert len(blocks) >= 3
        watching: list[tuple[subprocess.Popen[str], LineReader]] = []
        try:
            for heading, script in blocks:
                if script.startswith("nats sub "):
                    watching.append(_watch(script, readme_env, tmp_path))
                    continue
                code, output = _run_block(script, readme_env, tmp_path)
                assert code == 0, (heading, script, output[-2000:])
            assert len(watching) == 1
            # The watcher saw the turn that the next block's `nats pub` started, to its commit.
            watching[0][1].wait_for(re.compile(r"infer\.events\.demo\.commit"), timeout=60)
        finally:
            for proc, _ in watching:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
        examples = [code for heading, lang, code in _sections() if lang == "python"
                    and not any(s in heading for s in NOT_HERE_SECTIONS)]
        assert examples
        for example in examples:
            run = subprocess.run([sys.executable, "-c", example], env=readme_env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=180)
            assert run.returncode == 0, (example, run.stderr)
            assert run.stdout.strip(), example
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    finally:
        stop_child(up)


def test_readme_names_the_log_events_the_code_emits():
    """Each log event the README's Observability section names is an event name in the code."""
    section = README.split("## Observability", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z]+_[a-z_]+)`", section)) & {
        "chat_start", "chat_done", "stats_heartbeat", "model_loading", "up_ready",
        "nats_server_log",
    }
    assert {"chat_start", "chat_done", "stats_heartbeat"} <= named
    code = "".join(p.read_text() for d in ("actors", "node") for p in (ROOT / d).rglob("*.py"))
    for event in named:
        assert f'"{event}"' in code, event
