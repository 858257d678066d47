"""Check, in a child process, that current llama.cpp restores a sequence's state exactly.

The llama-cpp counterpart of ``verify``: evaluate a prompt on sequence 0, copy its state
into sequence 1, evaluate the same two tokens on both, and compare logits. A build whose
restore is wrong or crashes must cost the node its snapshots, never its sessions.

    python -m actors.engine.llamacpp_verify MODEL GPU_LAYERS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from actors.engine.verify import run_check_in_child


def check(model_path: Path, gpu_layers: int) -> dict[str, object]:
    """Load, evaluate, snapshot, restore into another sequence, compare logits."""
    from actors.engine.llama_model import ModelParams
    from actors.engine.llamacpp_backend import LlamaCppBackend

    backend = LlamaCppBackend(
        ModelParams(model_path, n_ctx=256, gpu_layers=gpu_layers, threads=1), n_seq=2
    )
    live, restored = backend.new_context(), backend.new_context()
    tokens = backend.tokenizer.encode(
        "The bank checks that a restored state equals the live one.", True
    )
    live.eval(tokens, 0)
    state = live.state_bytes()
    restored.set_state(state)
    live.eval(tokens[1:3], len(tokens))
    restored.eval(tokens[1:3], len(tokens))
    diff = float(np.abs(live.logits() - restored.logits()).max())
    return {"ok": diff == 0.0, "max_diff": diff, "nbytes": len(state)}


def verify_in_child(model_path: Path, gpu_layers: int, timeout: float = 300.0) -> tuple[bool, str]:
    """Run ``check`` in a child process; (ok, human reason)."""
    args = [str(model_path), str(gpu_layers)]
    return run_check_in_child("actors.engine.llamacpp_verify", args, timeout)


if __name__ == "__main__":
    out = check(Path(sys.argv[1]), int(sys.argv[2]))
    print(json.dumps(out))
    sys.exit(0)
