"""Check, in a child process, that a restored KV state gives the live state's logits.

Run at load: a library whose restore is wrong (the KV cache offloaded to a GPU, say) or
crashes (a build without libstdc++) must not take the node down or corrupt sessions; the
engine then runs without snapshots and logs why.

    python -m actors.engine.verify LIB MODEL GPU_LAYERS
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def check(lib_path: Path, model_path: Path, gpu_layers: int) -> dict[str, object]:
    """Load, evaluate, snapshot, restore into a second context, compare logits."""
    from actors.engine import llama_api
    from actors.engine.llama_model import LlamaModel, ModelParams

    lib = llama_api.load_library(lib_path, cuda=gpu_layers > 0)
    model = LlamaModel(lib, ModelParams(model_path, n_ctx=256, gpu_layers=gpu_layers, threads=1))
    live, restored = model.new_context(), model.new_context()
    tokens = model.tokenize("The bank checks that a restored state equals the live one.", True)
    live.eval(tokens, 0)
    state = live.state_bytes()
    restored.set_state(state)
    diffs = [float(np.abs(live.logits() - restored.logits()).max())]
    live.eval(tokens[1:3], len(tokens))
    restored.eval(tokens[1:3], len(tokens))
    diffs.append(float(np.abs(live.logits() - restored.logits()).max()))
    return {"ok": max(diffs) == 0.0, "max_diff": max(diffs), "nbytes": len(state)}


def verify_in_child(
    lib_path: Path, model_path: Path, gpu_layers: int, timeout: float = 300.0
) -> tuple[bool, str]:
    """Run ``check`` in a child process; (ok, human reason)."""
    args = [str(lib_path), str(model_path), str(gpu_layers)]
    return run_check_in_child("actors.engine.verify", args, timeout)


def run_check_in_child(module: str, args: list[str], timeout: float) -> tuple[bool, str]:
    """Run ``python -m module args`` (a restore check printing JSON); (ok, human reason).

    A child process, because a library that crashes while restoring must not take the node
    down with it.
    """
    cmd = [sys.executable, "-m", module, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return False, f"the restore check did not finish in {timeout:.0f} s"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return False, f"the restore check crashed (exit {proc.returncode}): {' | '.join(tail)}"
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return False, f"the restore check printed no result: {proc.stdout[-200:]!r}"
    if not result.get("ok"):
        return False, f"a restored state's logits differ from the live ones by {result['max_diff']}"
    return True, f"restored logits equal live logits ({result['nbytes']} bytes for a short prompt)"


if __name__ == "__main__":
    out = check(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(out))
    sys.exit(0)
