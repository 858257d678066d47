"""Try the engine on the model in a child process before the node loads it.

A library that crashes on this CPU (llama.cpp's AMX kernels on a machine that reports AMX but
faults on it), or whose restored states are wrong (ctransformers with the KV cache offloaded),
must cost the node a clear message or its snapshots, never a silent death in the first turn.
So before the weights load in the node, a child process loads them, evaluates a multi-token
prompt and, when snapshots are on, checks that a restored state gives the live logits.

The child prints one JSON line per stage it finished (``eval``, then ``restore``), so a crash
tells how far it got: a crash before ``eval`` means the engine cannot run at all, one after
it only that snapshots cannot be trusted.

When the evaluation crashes on a CPU that reports AMX, the probe runs again with AMX refused
(``actors.engine.amx``); if that works, this process refuses AMX too before it loads the
library, and says so in one log line. If the engine crashes either way, the node does not
start: ``EngineProbeError`` names the cause and the fix.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from actors.engine import amx
from actors.engine.backends.params import ModelLoadError

log = structlog.get_logger("infernode.engine")

PROBE_TEXT = "The bank checks that a restored state equals the live one."
"""The probe's prompt: a dozen tokens, evaluated as one batch (the case AMX faults on)."""
REFUSE_AMX_FLAG = "--refuse-amx"
RESTORE_FLAG = "--restore"
FIX = (
    "try --engine ctransformers, or reinstall llama-cpp-python built for a generic CPU: "
    "CMAKE_ARGS=\"-DGGML_NATIVE=off\" pip install --force-reinstall --no-cache-dir "
    "llama-cpp-python==0.3.36"
)

Stage = dict[str, object]


class EngineProbeError(ModelLoadError):
    """The engine crashed evaluating a prompt in the probe; the message says how to go on."""


@dataclass(frozen=True)
class ProbeVerdict:
    """What the child process showed."""

    evaluated: bool
    """The multi-token evaluation finished."""
    restore_ok: bool | None
    """A restored state gave the live logits; None when not checked (or not reached)."""
    reason: str
    """A human sentence: the crash, or the restore check's result."""
    crashed: bool = False
    """The child died of a signal (or hung) before evaluating: the library cannot run here.
    A child that raised instead (a missing library, a refused file) is not a crash: the
    node's own load then raises the same typed error."""


_verdicts: dict[tuple[object, ...], ProbeVerdict] = {}
"""Verdicts of this process, by engine, model file (path, size, mtime) and options."""


def probe_engine(
    engine: str, module: str, args: list[str], model: Path, restore: bool,
    timeout: float = 300.0,
) -> ProbeVerdict:
    """Probe once per model file and options in this process; refuse AMX where that helps."""
    stat = model.stat()
    key = (engine, module, tuple(args), str(model.resolve()), stat.st_size, stat.st_mtime_ns,
           restore)
    cached = _verdicts.get(key)
    if cached is not None:
        return cached
    verdict = run_probe(module, args, restore, amx.refused(), timeout)
    if not verdict.evaluated and not verdict.crashed:
        return verdict
    if not verdict.evaluated and _may_retry_without_amx():
        retry = run_probe(module, args, restore, True, timeout)
        if retry.evaluated:
            amx.refuse_amx()
            log.warning(
                "amx_refused", engine=engine,
                reason=f"{verdict.reason}; with AMX refused it evaluates, so this process "
                "computes on AVX-512 instead (the CPU reports AMX but faults on it)",
            )
        verdict = retry
    if not verdict.evaluated and verdict.crashed:
        tried = " (also with AMX refused)" if amx.cpu_reports_amx() else ""
        raise EngineProbeError(
            f"the {engine} engine cannot run {model.name} on this machine: {verdict.reason}"
            f"{tried}; {FIX}"
        )
    _verdicts[key] = verdict
    return verdict


def _may_retry_without_amx() -> bool:
    return amx.cpu_reports_amx() and amx.can_refuse() and not amx.refused()


def run_probe(
    module: str, args: list[str], restore: bool, refuse_amx: bool, timeout: float
) -> ProbeVerdict:
    """Run ``python -m module args`` (a probe printing its stages as JSON lines)."""
    cmd = [sys.executable, "-m", module, *args]
    if restore:
        cmd.append(RESTORE_FLAG)
    if refuse_amx:
        cmd.append(REFUSE_AMX_FLAG)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return ProbeVerdict(False, None, f"the probe did not finish in {timeout:.0f} s", True)
    stages = _stages(proc.stdout)
    if "eval" not in stages:
        error = stages.get("error")
        if error is not None:
            return ProbeVerdict(False, None, f"the probe failed: {error['message']}")
        return ProbeVerdict(False, None, _crash(proc, "evaluating a prompt"), True)
    if not restore:
        return ProbeVerdict(True, None, "")
    result = stages.get("restore")
    if result is None:
        error = stages.get("error")
        if error is not None:
            return ProbeVerdict(True, False, f"the restore check failed: {error['message']}")
        return ProbeVerdict(True, False, _crash(proc, "checking a restore"))
    if not result.get("ok"):
        return ProbeVerdict(
            True, False,
            f"a restored state's logits differ from the live ones by {result['max_diff']}",
        )
    return ProbeVerdict(
        True, True,
        f"restored logits equal live logits ({result['nbytes']} bytes for a short prompt)",
    )


def _stages(stdout: str) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    for line in stdout.splitlines():
        try:
            stage = json.loads(line)
        except ValueError:
            continue
        if isinstance(stage, dict) and isinstance(stage.get("stage"), str):
            stages[str(stage["stage"])] = stage
    return stages


def _crash(proc: subprocess.CompletedProcess[str], doing: str) -> str:
    code = proc.returncode
    how = f"exit {code}"
    if code < 0:
        with contextlib.suppress(ValueError):  # a signal number Python has no name for
            how = f"exit {code}, {signal.Signals(-code).name}"
    tail = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()][-2:]
    said = f": {' | '.join(tail)[-300:]}" if tail else ""
    return f"the probe crashed {doing} ({how}){said}"

def eval_and_restore(
    new_context: Callable[[], Any], tokens: list[int], restore: bool,
    compare_on_restore: bool = False,
) -> Iterator[Stage]:
    """A probe child's stages over a backend's contexts: evaluate ``tokens``; then, with
    ``restore``, set a fresh context to the live one's state and compare the logits both
    give for two more tokens. ``compare_on_restore`` also compares the logits right after
    the restore, for a backend whose state keeps them."""
    import numpy as np

    live = new_context()
    live.eval(tokens, 0)
    yield {"stage": "eval", "tokens": len(tokens)}
    if not restore:
        return
    restored = new_context()
    state = live.state_bytes()
    restored.set_state(state)
    diffs = [float(np.abs(live.logits() - restored.logits()).max())] if compare_on_restore else []
    live.eval(tokens[1:3], len(tokens))
    restored.eval(tokens[1:3], len(tokens))
    diffs.append(float(np.abs(live.logits() - restored.logits()).max()))
    yield {"stage": "restore", "ok": max(diffs) == 0.0, "max_diff": max(diffs),
           "nbytes": len(state)}



def child_main(argv: list[str], check: Callable[[list[str], bool], Iterator[Stage]]) -> None:
    """A probe's ``__main__``: refuse AMX if asked, then print each finished stage."""
    restore = RESTORE_FLAG in argv
    if REFUSE_AMX_FLAG in argv:
        amx.refuse_amx()
    args = [a for a in argv if a not in (RESTORE_FLAG, REFUSE_AMX_FLAG)]
    try:
        for stage in check(args, restore):
            print(json.dumps(stage), flush=True)
    except Exception as e:  # reported as a failure, told apart from a crash
        print(json.dumps({"stage": "error", "message": str(e)[-500:]}), flush=True)
        sys.exit(3)
    sys.exit(0)
