"""The anchor and window benchmarks run end to end in their quick modes without a
``llama-server`` binary: its column is n/a with the command that builds it, the rest is
measured, and the run exits 0. No speed is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quick_run_without_llama_server(script: str, tmp_path: Path, timeout: float) -> str:
    env = dict(os.environ)
    # Nowhere a llama-server could be found: not named, not in the env, not in the cache.
    env["INFERNODE_LLAMA_SERVER"] = str(tmp_path / "missing" / "llama-server")
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llama-server not built: run bench/build_llama_server.sh" in proc.stdout, proc.stdout
    return proc.stdout


def _ratio(stdout: str, name: str) -> str:
    line = next((x for x in stdout.splitlines() if x.startswith(name)), None)
    assert line is not None, f"no {name!r} line in:\n{stdout}"
    value, _op, _target, verdict = line[len(name):].split()
    assert verdict in ("PASS", "FAIL"), line
    return value


@pytest.mark.timeout(240)
def test_quick_anchor_benchmark_measures_everything_but_the_missing_llama_server(
    tmp_path: Path,
) -> None:
    """`python bench/anchor.py --quick` without llama-server measures every ratio against
    llama_cpp.server and both engines (the agent trace with each server restarted
    mid-trace among them), prints the llama-server-only ratio as n/a, exit 0."""
    pytest.importorskip("llama_cpp.server")
    out = _quick_run_without_llama_server("anchor.py", tmp_path, timeout=230)
    for name in ("(a) 2 sessions, TTFT turns >= 2: ours / best anchor",
                 "(a) back-to-back warm TTFT: ours / best anchor",
                 "(b) first turn TTFT agents 2+ / agent 1 (ours)",
                 "(b) first turn TTFT agents 2+: ours / best anchor",
                 "(a) 2 sessions TTFT: ctransformers / llama-cpp engine",
                 "(t a) 3 agents on the slots, TTFT turns >= 2: ours / best anchor",
                 "(t b) first turn after a restart: ours / best anchor"):
        float(_ratio(out, name))
    assert _ratio(out, "(c) 2 streams, decode tok/s: ours / llama-server") == "n/a"


@pytest.mark.timeout(120)
def test_quick_window_benchmark_measures_infernode_and_marks_llama_server_na(
    tmp_path: Path,
) -> None:
    """`python bench/window.py --quick` without llama-server drives one session past its
    window with shift and with truncate and prints both ratios of each; llama-server's are
    n/a; exit 0."""
    out = _quick_run_without_llama_server("window.py", tmp_path, timeout=110)
    for policy in ("shift", "truncate"):
        float(_ratio(out, f"infernode {policy}: after-fill / warm TTFT"))
        float(_ratio(out, f"infernode {policy}: prefix-hit / kept tokens"))
    assert _ratio(out, "llama-server --context-shift: after-fill / warm TTFT") == "n/a"


@pytest.mark.timeout(120)
def test_quick_warm_turn_benchmark_prints_the_ratio_and_the_nodes_breakdown() -> None:
    """`python bench/warm_turn.py --quick` prints the warm-turn TTFT ratio with a value and
    the node's per-part timings, exit 0."""
    pytest.importorskip("llama_cpp.server")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "warm_turn.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    float(_ratio(proc.stdout, "warm same-session TTFT: ours / llama_cpp.server"))
    assert "prefill_ms" in proc.stdout and "client TTFT beyond the engine" in proc.stdout
