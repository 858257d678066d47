"""The README says what the code does: its flags and commands are real, its examples run."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import pytest

from node.cli import UP_FLAGS, build_parser
from node.client import InfernodeClient
from node.config import ENV_PREFIX, NodeConfig
from schemas.messages import AnswerReply, PromptRequest
from tests.support.bash import run_bash

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_configuration_row_names_a_real_flag_and_its_variable():
    """Each `| --flag | INFERNODE_X |` row is a flag of `up` that sets the field X."""
    rows = re.findall(r"^\| `(--[a-z-]+)` \| `(INFERNODE_[A-Z_]+)` \|", README, re.M)
    assert len(rows) >= 15
    fields = {f.name for f in dataclasses.fields(NodeConfig)}
    for flag, var in rows:
        assert flag in UP_FLAGS, flag
        assert UP_FLAGS[flag] == var[len(ENV_PREFIX):].lower() in fields, (flag, var)
    documented = {flag for flag, _ in rows}
    assert set(UP_FLAGS) <= documented, set(UP_FLAGS) - documented


def test_every_flag_in_up_flags_is_accepted_by_the_parser():
    """UP_FLAGS and the parser agree, so the README table cannot name a dead flag."""
    up = build_parser()._subparsers._group_actions[0].choices["up"]  # type: ignore[union-attr]
    accepted = {opt for action in up._actions for opt in action.option_strings}
    assert set(UP_FLAGS) <= accepted


def test_ci_runs_the_readme_test_command():
    """.ci/run runs exactly the test command the README gives."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines()]
    assert "python -m pytest -q" in commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "python -m pytest -q" in [line.strip() for line in ci]


def test_cli_commands_in_the_readme_name_real_commands_and_flags():
    """Every `infernode ...` line of the README's command-line block uses real commands and
    flags."""
    block = README.split("## Command line", 1)[1].split("```", 2)[1]
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    seen = 0
    for line in block.splitlines():
        words = line.split("#")[0].split()
        if words[:1] != ["infernode"]:
            continue
        seen += 1
        sub = commands[words[1]]
        if words[1] == "demo":
            sub = sub._subparsers._group_actions[0].choices[words[2]]  # type: ignore[union-attr]
        accepted = {opt for action in sub._actions for opt in action.option_strings}
        for flag in re.findall(r"--[a-z-]+", line.split("#")[0]):
            assert flag in accepted, (line, flag)
    assert seen >= 8


def test_every_flag_a_config_error_suggests_exists():
    """A ConfigError tells the user which flag to pass; each such flag is a real `up` flag."""
    source = (ROOT / "node" / "config_checks.py").read_text()
    suggested = set(re.findall(r'"(--[a-z][a-z-]+)"', source))
    assert len(suggested) >= 10
    assert suggested <= set(UP_FLAGS), suggested - set(UP_FLAGS)


def section(heading: str) -> str:
    """The README's text under ``heading``, up to the next heading of any level."""
    body = README.split(heading + "\n", 1)[1]
    return re.split(r"^#{1,6} ", body, maxsplit=1, flags=re.M)[0]


async def test_the_readme_ask_lines_print_the_answers(make_node, tmp_path: Path):
    """Each `nats req infer.ask...` line of the README, run verbatim, prints an answer."""
    node = await make_node()
    block = section("### One request, one answer: `infer.ask.<session>`").split("```bash\n")[1]
    lines = [x for x in block.split("```")[0].splitlines() if x.strip()]
    assert lines and all(x.startswith("nats req infer.ask.demo ") for x in lines)
    generations = []
    for line in lines:
        code, out, err = await run_bash(line, node.url, tmp_path)
        assert code == 0, (line, out, err)
        generations.append(AnswerReply.model_validate_json(out).generation)
    assert generations == list(range(1, len(lines) + 1))


def blocks(heading: str, lang: str) -> list[str]:
    """The ``lang`` code blocks under ``heading``."""
    return re.findall(rf"```{lang}\n(.*?)```", section(heading), re.S)


async def run_python(code: str, url: str) -> tuple[int, str, str]:
    """Run a README Python block verbatim in a fresh interpreter, against the node at ``url``."""
    env = {**os.environ, "INFERNODE_NATS_URL": url, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_the_readme_python_example_streams_asks_and_reads_history(make_node):
    """The README's Python API example, run verbatim, streams a turn, asks (generation 2) and
    prints the answer text, also as read back from the history."""
    node = await make_node()
    (code,) = blocks("### With the Python API", "python")
    rc, out, err = await run_python(code, node.url)
    assert rc == 0, err
    async with InfernodeClient(node.url) as client:
        records = (await client.history("my-session")).records
    answer = [r.content for r in records if r.kind == "assistant"][-1]
    # The ask's answer, its generation, finish and token count, then that answer again as the
    # history's last assistant record (not the commit record that follows it).
    said = re.search(re.escape(f"{answer}\n") + r"2 (stop|length) (\d+)\n"
                     + re.escape(f"{answer}\n") + r"\Z", out)
    assert said is not None and 0 < int(said.group(2)) <= 16, out


TOOLS_ACCEPTED = "tools" in PromptRequest.model_fields


@pytest.mark.skipif(not TOOLS_ACCEPTED, reason="prompts do not accept tools in this build")
async def test_the_readme_agent_loop_runs_with_the_nats_cli_and_the_python_client(
    make_node, tmp_path: Path
):
    """The README's agent loop, run verbatim both ways, gets a forced call to get_weather,
    sends its result, and gets a final text answer; the history holds call and result."""
    node = await make_node()
    heading = "### An agent loop with tools"
    (script,) = blocks(heading, "bash")
    rc, out, err = await run_bash("set -euo pipefail\n" + script, node.url, tmp_path)
    assert rc == 0, (out, err)
    call = json.loads(out.splitlines()[0])
    assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"] in (
        "Paris", "Tokyo")
    (code,) = blocks(heading, "python")
    rc, out, err = await run_python(code, node.url)
    assert rc == 0, err
    assert out.splitlines()[-1].split()[0] in ("stop", "length")
    async with InfernodeClient(node.url) as client:
        for session in ("agent", "agent-py"):
            records = (await client.history(session)).records
            roles = [r.role for r in records if r.kind in ("user", "assistant")]
            assert roles == ["user", "assistant", "tool", "assistant"], (session, roles)
