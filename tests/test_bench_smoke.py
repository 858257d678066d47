"""The engine benchmark runs end to end in its quick mode; no speed is asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATIO_LINES = (
    "decode tok/s: ours / ctransformers LLM",
    "TTFT: warm slot / cold slot",
    "history: restore snapshot / recompute",
    "RSS: 4 slots / 1 slot",
)


@pytest.mark.timeout(90)
def test_quick_engine_benchmark_prints_every_ratio_and_exits_0() -> None:
    """`python bench/engine.py --quick` prints each ratio with a value and a verdict, exit 0."""
    pytest.importorskip("ctransformers")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "engine.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for name in RATIO_LINES:
        line = next((x for x in lines if x.startswith(name)), None)
        assert line is not None, f"no {name!r} line in:\n{proc.stdout}"
        value, _op, _target, verdict = line[len(name) :].split()
        float(value)  # measured, whatever it is
        assert verdict in ("PASS", "FAIL")
