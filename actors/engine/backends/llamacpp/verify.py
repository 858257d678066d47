"""The llama-cpp engine's probe, run in a child process by ``actors.engine.probe``.

Evaluate a prompt on sequence 0 (a multi-token batch: the case a faulting CPU crashes on);
then, with ``--restore``, copy its state into sequence 1, evaluate the same two tokens on
both, and compare logits. A build whose restore is wrong or crashes must cost the node its
snapshots, never its sessions.

    python -m actors.engine.backends.llamacpp.verify MODEL GPU_LAYERS [--restore] [--refuse-amx]
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from actors.engine.probe import PROBE_TEXT, Stage, child_main, eval_and_restore


def check(args: list[str], restore: bool) -> Iterator[Stage]:
    """Load and evaluate; then snapshot, restore into another sequence, compare logits."""
    from actors.engine.backends.llamacpp.backend import LlamaCppBackend
    from actors.engine.backends.params import ModelParams

    model_path, gpu_layers = Path(args[0]), int(args[1])
    backend = LlamaCppBackend(
        ModelParams(model_path, n_ctx=256, gpu_layers=gpu_layers, threads=1), n_seq=2
    )
    tokens = backend.tokenizer.encode(PROBE_TEXT, True)
    yield from eval_and_restore(backend.new_context, tokens, restore)


def probe_args(model_path: Path, gpu_layers: int) -> list[str]:
    """The child's arguments for ``probe_engine``."""
    return [str(model_path), str(gpu_layers)]


if __name__ == "__main__":
    child_main(sys.argv[1:], check)
