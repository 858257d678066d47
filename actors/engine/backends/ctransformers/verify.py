"""The ctransformers engine's probe, run in a child process by ``actors.engine.probe``.

Evaluate a prompt; then, with ``--restore``, check that a restored KV state gives the live
state's logits. A library whose restore is wrong (the KV cache offloaded to a GPU, say) or
crashes (a build without libstdc++) must not take the node down or corrupt sessions; the
engine then runs without snapshots and logs why.

    python -m actors.engine.backends.ctransformers.verify \
        LIB MODEL GPU_LAYERS [--restore] [--refuse-amx]
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from actors.engine.probe import PROBE_TEXT, Stage, child_main, eval_and_restore


def check(args: list[str], restore: bool) -> Iterator[Stage]:
    """Load and evaluate; then snapshot, restore into a second context, compare logits."""
    from actors.engine.backends.ctransformers import api as llama_api
    from actors.engine.backends.ctransformers.model import LlamaModel
    from actors.engine.backends.params import ModelParams

    lib_path, model_path, gpu_layers = Path(args[0]), Path(args[1]), int(args[2])
    lib = llama_api.load_library(lib_path, cuda=gpu_layers > 0)
    model = LlamaModel(lib, ModelParams(model_path, n_ctx=256, gpu_layers=gpu_layers, threads=1))
    tokens = model.tokenize(PROBE_TEXT, True)
    yield from eval_and_restore(model.new_context, tokens, restore, compare_on_restore=True)


def probe_args(lib_path: Path, model_path: Path, gpu_layers: int) -> list[str]:
    """The child's arguments for ``probe_engine``."""
    return [str(lib_path), str(model_path), str(gpu_layers)]


if __name__ == "__main__":
    child_main(sys.argv[1:], check)
