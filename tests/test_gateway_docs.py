"""The README's OpenAI section runs as written: its curl lines, its SDK examples (a stateless
conversation and a tool-calling loop), and `infernode openai` serving a node on its own."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import httpx

from tests.helpers import openai_base

ROOT = Path(__file__).resolve().parents[1]
SECTION = (ROOT / "README.md").read_text().split("## OpenAI-compatible API", 1)[1] \
    .split("\n## ", 1)[0]


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", SECTION, re.S)


async def _run(command: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *command, env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_readme_curl_lines_run_verbatim_against_the_gateway(make_node):
    """Each curl line of the README gets a model list, an answer, and a stream with usage."""
    node = await make_node(openai_port=0)
    base = f"http://127.0.0.1:{node.gateway.port}/v1"
    lines = [line for line in _blocks("bash")[1].splitlines() if line.startswith("curl")]
    assert len(lines) == 3
    outputs = []
    for line in lines:
        code, out, err = await _run(["bash", "-c", line], {"BASE": base})
        assert code == 0, (line, err)
        outputs.append(out)
    assert json.loads(outputs[0])["data"][0]["id"] == node.config.model.stem
    assert json.loads(outputs[1])["choices"][0]["message"]["content"]
    events = [e[len("data: "):] for e in outputs[2].split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] > 0


async def test_readme_sdk_example_runs_and_reuses_the_conversation(make_node):
    """The README's stateless SDK loop runs; its second call reports cached tokens."""
    node = await make_node(openai_port=0)
    code, out, err = await _run(
        [sys.executable, "-c", _blocks("python")[0]],
        {"OPENAI_BASE_URL": f"http://127.0.0.1:{node.gateway.port}/v1", "PYTHONPATH": str(ROOT)},
    )
    assert code == 0, err
    cached = [int(line.rsplit(" ", 1)[1]) for line in out.strip().splitlines()]
    assert len(cached) == 2 and cached[0] == 0 and cached[1] > 0


async def test_readme_tool_calling_example_gets_a_valid_call_and_reuses_the_prefix(make_node):
    """The README's tool loop gets a forced call valid for its schema, then an answer that
    reused every token of the first turn."""
    node = await make_node(openai_port=0)
    code, out, err = await _run(
        [sys.executable, "-c", _blocks("python")[1]],
        {"OPENAI_BASE_URL": f"http://127.0.0.1:{node.gateway.port}/v1", "PYTHONPATH": str(ROOT)},
    )
    assert code == 0, err
    called, reused = out.strip().splitlines()
    finish, name, arguments = called.split(" ", 2)
    assert (finish, name) == ("tool_calls", "get_weather")
    city = json.loads(arguments)["city"]
    assert set(json.loads(arguments)) == {"city"} and isinstance(city, str) and len(city) <= 20
    word, cached, of, total = reused.split(" ")
    assert (word, of) == ("reused", "of") and int(cached) == int(total) > 0


async def test_infernode_openai_serves_a_node_on_its_own_and_stops_on_sigterm(make_node):
    """`infernode openai --nats-url URL --port P` answers chat completions; SIGTERM ends it."""
    node = await make_node()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node.cli", "openai", "--nats-url", node.url, "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        base = await openai_base(proc)
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(f"{base}/chat/completions", json={
                "model": "any", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert r.json()["model"] == node.config.model.stem
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
