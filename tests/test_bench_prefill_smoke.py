"""The chunked-prefill benchmark runs end to end in its quick mode and prints both ratios with
a value and a verdict; no speed is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from actors.engine.backends.llamacpp.backend import llama_cpp_available

ROOT = Path(__file__).resolve().parents[1]
RATIO_LINES = (
    "p99 ITL during a long prefill: chunked / n_batch chunks",
    "long prefill time: chunked / n_batch chunks",
)


@pytest.mark.timeout(90)
@pytest.mark.skipif(not llama_cpp_available(), reason="the benchmark runs the llama-cpp engine")
def test_quick_prefill_interleave_benchmark_prints_both_ratios_and_exits_0() -> None:
    """`python bench/prefill_interleave.py --quick` prints each ratio measured, exit 0."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "prefill_interleave.py"), "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=80, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for name in RATIO_LINES:
        line = next((x for x in lines if x.startswith(name)), None)
        assert line is not None, f"no {name!r} line in:\n{proc.stdout}"
        value, _op, _target, verdict = line[len(name):].split()
        float(value)
        assert verdict in ("PASS", "FAIL"), line
