"""The README says what the code does: its flags, variables and test command are the real ones."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from node.cli import UP_FLAGS, build_parser
from node.config import ENV_PREFIX, NodeConfig

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
    """Every `infernode ...` line of the README's command-line block uses real commands and flags."""
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
    source = (ROOT / "node" / "config.py").read_text()
    suggested = set(re.findall(r'"(--[a-z][a-z-]+)"', source))
    assert len(suggested) >= 10
    assert suggested <= set(UP_FLAGS), suggested - set(UP_FLAGS)
