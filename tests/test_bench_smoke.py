"""The engine, grammar, gateway and shared-prefix benchmarks run end to end in their quick
modes; no speed is asserted."""

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


GRAMMAR_RATIO_LINES = (
    "decode tok/s: JSON schema / free",
    "tool loop: prefix-hit / reusable tokens (turns >= 2)",
)


def _check_quick_run(script: str, names: tuple[str, ...], timeout: float = 60) -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for name in names:
        line = next((x for x in lines if x.startswith(name)), None)
        assert line is not None, f"no {name!r} line in:\n{proc.stdout}"
        value, _op, _target, verdict = line[len(name) :].split()
        # Measured, whatever it is: "n/a" means a side did not run, and stderr says why.
        assert value != "n/a", f"{line}\n{proc.stderr[-3000:]}"
        float(value)
        assert verdict in ("PASS", "FAIL")
    return lines


@pytest.mark.timeout(90)
def test_quick_engine_benchmark_prints_every_ratio_and_exits_0() -> None:
    """`python bench/engine.py --quick` prints each ratio with a value and a verdict, exit 0."""
    pytest.importorskip("ctransformers")
    _check_quick_run("engine.py", RATIO_LINES)


@pytest.mark.timeout(90)
def test_quick_grammar_benchmark_prints_both_ratios_and_exits_0() -> None:
    """`python bench/grammar.py --quick` prints the grammar and tool-loop ratios, exit 0."""
    _check_quick_run("grammar.py", GRAMMAR_RATIO_LINES)


GATEWAY_RATIO_LINES = (
    "TTFT turns>=2: ours / llama_cpp.server",
    "prefix hit: cached / reusable tokens",
    "gateway overhead p50 ms (over NATS direct)",
)


@pytest.mark.timeout(150)
def test_quick_gateway_benchmark_prints_every_ratio_and_exits_0() -> None:
    """`python bench/gateway.py --quick` prints each ratio with a verdict, exit 0; the prefix
    hit of the stateless conversations is measured and meets its target."""
    lines = _check_quick_run("gateway.py", GATEWAY_RATIO_LINES, timeout=140)
    hit = next(x for x in lines if x.startswith(GATEWAY_RATIO_LINES[1]))
    assert float(hit[len(GATEWAY_RATIO_LINES[1]):].split()[0]) >= 0.95, hit


@pytest.mark.timeout(90)
def test_quick_shared_prefix_benchmark_prints_its_ratio_and_exits_0() -> None:
    """`python bench/shared_prefix.py --quick` prints the agents 2–8 ÷ agent 1 first-turn TTFT
    ratio with a value and a verdict, exit 0."""
    _check_quick_run("shared_prefix.py", ("first-turn TTFT: agents 2–8 / agent 1",))


SOAK_RATIO_LINES = (
    "turn time at equal prompt size: last / first",
    "node CPU per turn: last / first",
    "RSS: at the end / when the bank reached its cap",
    "turns answered / sent",
)


@pytest.mark.timeout(180)
def test_quick_soak_benchmark_answers_every_turn_and_prints_every_ratio() -> None:
    """`python bench/soak.py --quick` answers all its turns and prints each ratio, exit 0."""
    lines = _check_quick_run("soak.py", SOAK_RATIO_LINES, timeout=170)
    answered = next(x for x in lines if x.startswith("turns answered / sent"))
    assert answered.split()[-1] == "PASS", "\n".join(lines)


@pytest.mark.timeout(120)
def test_quick_agent_trace_runs_and_warm_turns_reuse_every_token_the_previous_turns_left() -> None:
    """`python bench/agent_trace.py --quick` exits 0; each warm turn restores all it could."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "agent_trace.py"), "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reuse = next(x for x in proc.stdout.splitlines() if x.startswith("warm reuse of reusable"))
    assert reuse.split(":")[1].split()[0] == "1.000", reuse


CLUSTER_RATIO_LINES = (
    "failover: kill -> first token / lease TTL",
    "moved turn TTFT: restored / recomputed",
    "admissions/s: 3 servers, replicas 3 / 1 server",
    "durable admissions/s: 2 nodes / 1 node",
    "durable admissions/s: 3 nodes / 1 node",
)


@pytest.mark.timeout(180)
def test_quick_cluster_benchmark_moves_the_sessions_and_prints_both_ratios() -> None:
    """`python bench/cluster.py --quick` kills a node, measures the failover ratios and the
    admission rates with 1, 2 and 3 nodes, and exits 0; the moved turns restored their KV
    from the bank."""
    lines = _check_quick_run("cluster.py", CLUSTER_RATIO_LINES, timeout=170)
    assert any("(cache bank)" in x for x in lines), "\n".join(lines)


@pytest.mark.timeout(90)
def test_quick_speculation_benchmark_prints_its_ratio_and_exits_0() -> None:
    """`python bench/speculation.py --quick` prints the speculation on / off ratio, exit 0."""
    from actors.engine.backends.llamacpp.backend import llama_cpp_available

    if not llama_cpp_available():
        pytest.skip("speculation runs on the llama-cpp engine, which is not installed")
    _check_quick_run("speculation.py", ("decode tok/s: speculation on / off",))
