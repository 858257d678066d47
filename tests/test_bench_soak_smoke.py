"""The soak benchmark runs end to end in its quick mode; no speed or memory is asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RATIO_LINES = (
    "RSS: largest after warm-up / at warm-up",
    "turn time: last 10% / first 10%",
    "node CPU per turn: last 10% / first 10%",
    "turns answered / sent",
)


@pytest.mark.timeout(180)
def test_quick_soak_benchmark_answers_every_turn_and_prints_every_ratio() -> None:
    """`python bench/soak.py --quick` answers all its turns and prints each ratio, exit 0."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=170, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for name in RATIO_LINES:
        line = next((x for x in lines if x.startswith(name)), None)
        assert line is not None, f"no {name!r} line in:\n{proc.stdout}"
        value, _op, _target, verdict = line[len(name) :].split()
        float(value)  # measured, whatever it is
        assert verdict in ("PASS", "FAIL")
    answered = next(x for x in lines if x.startswith("turns answered / sent"))
    assert answered.split()[-1] == "PASS", proc.stdout
