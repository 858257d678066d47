"""Real coding agents against a node, turn after turn in one project folder: how much of each
turn's prompt the node had banked, and how soon the first token came.

Each installed client (opencode, Codex, Claude Code, aider; one not installed is skipped,
with a line saying so) runs ``--turns`` prompts in its own temporary project, every turn
after the first continuing the same conversation, through ``bench/agent_proxy.py`` in front
of one ``infernode up``. The proxy's log gives, per request the client sent: prompt tokens
and cached tokens from the usage the node streamed, hit % (cached ÷ the previous request's
prompt), and TTFT (request to the first generated text or call). Target: from turn 2 on,
hit ≥ 95%; turn-2 TTFT ÷ turn-1 TTFT ≤ 0.1 on a 20k-token agent prompt.

    python -m bench.agents --model smollm2 --turns 5 --agents-prefix /tmp/agents
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

PROMPTS = [
    "create hello.py that prints hello",
    "add a function greet(name) to hello.py that returns a greeting",
    "add a test for greet in test_hello.py",
    "make hello.py print greet('world') when run",
    "add a docstring to every function in hello.py",
]
MODEL_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/messages")
_FIRST_OUTPUT = ('"content":', '"tool_calls"', "response.output_text.delta",
                 "response.function_call_arguments.delta", "content_block_delta")


@dataclass(frozen=True)
class Row:
    """One request a client sent: its usage and time to first token."""

    turn: int
    path: str
    prompt: int
    cached: int
    hit: float | None
    ttft_s: float | None


def sse_events(text: str) -> Iterator[dict[str, Any]]:
    """The JSON ``data:`` payloads of an SSE stream, in order (comments and [DONE] skipped)."""
    for line in text.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            if payload and payload != "[DONE]":
                try:
                    yield json.loads(payload)
                except ValueError:
                    continue


def _usage(payload: dict[str, Any]) -> tuple[int, int] | None:
    """(prompt, cached) from one chat chunk, Responses event or Messages event or body."""
    if payload.get("type") in ("response.completed", "response.incomplete"):
        payload = payload["response"]
    if payload.get("type") == "message_start":
        payload = payload["message"]
    usage = payload.get("usage") or {}
    if "prompt_tokens" in usage:
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return usage["prompt_tokens"], cached
    if "input_tokens" in usage and "input_tokens_details" in usage:
        return usage["input_tokens"], usage["input_tokens_details"].get("cached_tokens") or 0
    if "cache_read_input_tokens" in usage:
        read = usage.get("cache_read_input_tokens") or 0
        made = usage.get("cache_creation_input_tokens") or 0
        return usage["input_tokens"] + read + made, read
    return None


def usage_of(record: dict[str, Any]) -> tuple[int, int] | None:
    """The last usage an exchange's answer carried, streamed or whole."""
    text = "".join(chunk for _, chunk in record["chunks"])
    found = None
    for payload in sse_events(text):
        found = _usage(payload) or found
    if found is None:
        try:
            found = _usage(json.loads(text))
        except (ValueError, AttributeError):
            return None
    return found


def ttft_of(record: dict[str, Any]) -> float | None:
    """Seconds from the request to the first chunk carrying generated text or a call."""
    for at, chunk in record["chunks"]:
        if any(mark in chunk for mark in _FIRST_OUTPUT) and "data:" in chunk:
            return at
    return record["chunks"][0][0] if record["chunks"] else None


def node_turns(log: Path) -> list[tuple[float, int, int]]:
    """(end time, prompt, cached) of each committed turn in the node's JSON log."""
    found = []
    for line in log.read_text().splitlines() if log.exists() else []:
        if '"chat_done"' not in line:
            continue
        event = json.loads(line)
        if event.get("event") == "chat_done" and event.get("outcome") == "committed":
            at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
            found.append((at, event["prompt_tokens"], event["cached_tokens"]))
    return found


def _from_node(record: dict[str, Any], turns: list[tuple[float, int, int]],
               used: set[int]) -> tuple[int, int] | None:
    """The usage of a stream that carried none (aider asks for none): the node's turn that
    ended while the exchange was open."""
    start, end = record["wall"], record["wall"] + record.get("seconds", 0) + 0.5
    for i, (at, prompt, cached) in enumerate(turns):
        if i not in used and start <= at <= end:
            used.add(i)
            return prompt, cached
    return None


def rows(records: Iterable[dict[str, Any]],
         turns: list[tuple[float, int, int]] | None = None) -> list[Row]:
    """The model requests of one client's log in order, with hit % against the previous;
    usage the stream lacks is taken from the node's turns (``node_turns``)."""
    out: list[Row] = []
    previous = 0
    used: set[int] = set()
    for record in records:
        if record["path"] not in MODEL_PATHS or record["status"] != 200:
            continue
        usage = usage_of(record) or _from_node(record, turns or [], used)
        if usage is None:
            continue
        prompt, cached = usage
        hit = cached / previous if previous else None
        out.append(Row(len(out) + 1, record["path"], prompt, cached, hit, ttft_of(record)))
        previous = prompt
    return out


def refusals(records: Iterable[dict[str, Any]]) -> str:
    """How many model requests the node refused, by status (the table lists the rest)."""
    statuses = [r["status"] for r in records if r["path"] in MODEL_PATHS and r["status"] != 200]
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    return ", ".join(f"{n} × {s}" for s, n in counts.items()) or "none"


def table(client: str, found: list[Row]) -> str:
    """The per-client table: turn, prompt tokens, cached tokens, hit %, TTFT."""
    lines = [f"## {client}", "", "| turn | route | prompt | cached | hit % | TTFT s |",
             "|---|---|---|---|---|---|"]
    for r in found:
        hit = "-" if r.hit is None else f"{100 * r.hit:.0f}"
        ttft = "-" if r.ttft_s is None else f"{r.ttft_s:.2f}"
        lines.append(f"| {r.turn} | {r.path} | {r.prompt} | {r.cached} | {hit} | {ttft} |")
    if len(found) >= 2 and found[0].ttft_s and found[1].ttft_s:
        lines.append(f"\nturn-2 TTFT ÷ turn-1 TTFT: {found[1].ttft_s / found[0].ttft_s:.3f}")
    if not found:
        lines.append("| - | no answered model request | | | | |")
    return "\n".join(lines)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The proxy's records, in the order the exchanges ended."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- running the clients -------------------------------------------------------------------

def _opencode_config(project: Path, base: str) -> None:
    provider = {"npm": "@ai-sdk/openai-compatible", "name": "infernode",
                "options": {"baseURL": f"{base}/v1", "apiKey": "unused"},
                # A cap on the answer: a random-weight model never ends its own.
                "models": {"local": {"name": "local",
                                     "limit": {"context": 131072, "output": 256}}}}
    (project / "opencode.json").write_text(json.dumps(
        {"provider": {"infernode": provider}, "model": "infernode/local",
         "autoupdate": False, "share": "disabled"}))


def _codex_home(home: Path, base: str) -> None:
    (home / "config.toml").write_text(
        'model = "local"\nmodel_provider = "infernode"\n\n[model_providers.infernode]\n'
        f'name = "infernode"\nbase_url = "{base}/v1"\nwire_api = "responses"\n')


def command(client: str, tool: Path, prompt: str, first: bool, base: str, home: Path,
            project: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one turn of ``client`` in ``project`` (opencode
    takes its folder from PWD, not from the working directory)."""
    env = {**os.environ, "HOME": str(home), "PWD": str(project)}
    if client == "opencode":
        return [str(tool), "run", "--model", "infernode/local",
                *([] if first else ["--continue"]), prompt], env
    if client == "codex":
        env["CODEX_HOME"] = str(home)
        _codex_home(home, base)
        resume = [] if first else ["resume", "--last"]
        return [str(tool), "exec", "--skip-git-repo-check", *resume, prompt], env
    if client == "claude":
        env.update(ANTHROPIC_BASE_URL=base, ANTHROPIC_API_KEY="sk-ant-unused",
                   CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", DISABLE_AUTOUPDATER="1")
        return [str(tool), "-p", *([] if first else ["--continue"]),
                "--permission-mode", "acceptEdits", prompt], env
    return [str(tool), "--openai-api-base", f"{base}/v1", "--openai-api-key", "unused",
            "--model", "openai/local", "--yes-always", "--no-git", "--no-show-model-warnings",
            "--no-check-update", "--analytics-disable", "--no-pretty",
            "--restore-chat-history", "--message", prompt], env


def find_client(client: str, prefix: Path) -> Path | None:
    """The installed client's executable under the private prefix, else on PATH."""
    name = {"opencode": "opencode", "codex": "codex", "claude": "claude", "aider": "aider"}
    here = (prefix / "venv" / "bin" / "aider") if client == "aider" else (
        prefix / "node_modules" / ".bin" / name[client])
    if here.exists():
        return here
    found = shutil.which(name[client])
    return Path(found) if found else None


def run_client(client: str, tool: Path, turns: int, base: str, timeout_s: float,
               home: Path) -> None:
    """``turns`` prompts of one client in one fresh project folder. ``home`` is kept between
    runs: opencode installs its provider package there on first use."""
    root = Path(tempfile.mkdtemp(prefix=f"agents-{client}-"))
    project = root / "project"
    project.mkdir()
    home.mkdir(parents=True, exist_ok=True)
    _opencode_config(project, base)
    for turn in range(turns):
        cmd, env = command(client, tool, PROMPTS[turn % len(PROMPTS)], turn == 0, base, home,
                           project)
        start = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True,
                                  timeout=timeout_s, stdin=subprocess.DEVNULL)
            said = done.stdout + done.stderr
            (root / f"turn-{turn + 1}.log").write_text(said)
            tail = " / ".join(line.strip() for line in said.strip().splitlines()[-3:])
            print(f"  {client} turn {turn + 1}: rc {done.returncode} in "
                  f"{time.monotonic() - start:.0f} s: {tail[:240]}", flush=True)
        except subprocess.TimeoutExpired as e:
            said = [part.decode() if isinstance(part, bytes) else part or ""
                    for part in (e.stdout, e.stderr)]
            (root / f"turn-{turn + 1}.log").write_text("".join(said))
            print(f"  {client} turn {turn + 1}: timed out after {timeout_s:.0f} s", flush=True)


# -- the node and the proxy ----------------------------------------------------------------

def _wait_http(url: str, process: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {deadline_s:.0f} s")


def start_node(args: argparse.Namespace, work: Path) -> subprocess.Popen[bytes]:
    """``infernode up`` on the chosen model, its gateway on ``args.port``."""
    infernode = str(Path(sys.executable).parent / "infernode")
    cmd = [infernode, "up", "--model", args.model, "--nats-port", "0", "--openai-port",
           str(args.port), "--data-dir", str(work / "node"), "--log-format", "json",
           *args.node_args]
    node = subprocess.Popen(cmd, stdout=(work / "node.log").open("w"), stderr=subprocess.STDOUT)
    _wait_http(f"http://127.0.0.1:{args.port}/v1/models", node, 300)
    return node


def start_proxy(upstream: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """The logging proxy in front of the gateway, recording into ``log``."""
    proxy = subprocess.Popen([sys.executable, "-m", "bench.agent_proxy", "--upstream",
                              upstream, "--port", str(port), "--log", str(log)])
    _wait_http(f"http://127.0.0.1:{port}/v1/models", proxy, 30)
    return proxy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--clients", default="opencode,codex,claude,aider")
    parser.add_argument("--agents-prefix", type=Path, default=Path("/tmp/agents"),
                        help="npm --prefix of the clients; aider in its venv/ below it")
    parser.add_argument("--port", type=int, default=8020)
    parser.add_argument("--turn-timeout-s", type=float, default=600)
    parser.add_argument("node_args", nargs="*", help="more `infernode up` flags, after --")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="agents-bench-"))
    node = start_node(args, work)
    upstream = f"http://127.0.0.1:{args.port}"
    try:
        for i, client in enumerate(args.clients.split(",")):
            tool = find_client(client, args.agents_prefix)
            if tool is None:
                print(f"## {client}\n\nskipped: not installed (no {client} under "
                      f"{args.agents_prefix} nor on PATH)\n", flush=True)
                continue
            log = work / f"{client}.jsonl"
            proxy = start_proxy(upstream, args.port + 1 + i, log)
            try:
                run_client(client, tool, args.turns, f"http://127.0.0.1:{args.port + 1 + i}",
                           args.turn_timeout_s, args.agents_prefix / f"home-{client}")
            finally:
                proxy.terminate()
                proxy.wait()
            records = read_log(log)
            print(table(client, rows(records, node_turns(work / "node.log"))), flush=True)
            print(f"\nrefused requests: {refusals(records)}\n", flush=True)
    finally:
        node.terminate()
        node.wait()
    print(f"logs: {work}")


if __name__ == "__main__":
    main()
