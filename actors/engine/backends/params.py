"""What every backend shares: the parameters a model loads with, the threads an evaluation
uses, and the errors a library's refusal becomes.

Both engines (``backends/ctransformers`` and ``backends/llamacpp``) load from one
``ModelParams`` and raise the same two errors, so the loader and the node's start name a
refusal the same way whichever engine made it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from actors.engine.library_log import refusal_reason


class LlamaLibraryError(RuntimeError):
    """The llama.cpp library could not be found, loaded or bound."""


class ModelLoadError(RuntimeError):
    """The model file could not be loaded by the library."""


@dataclass(frozen=True)
class ModelParams:
    """What the library needs to load a model and make contexts."""

    path: Path
    """The GGUF file."""
    n_ctx: int = 2048
    """Context length of each slot."""
    n_batch: int = 512
    """Prompt tokens evaluated per call."""
    gpu_layers: int = 0
    """Layers offloaded to CUDA (0 = CPU only)."""
    threads: int = 1
    """Threads per evaluation; 0 decides per evaluation from the idle cores."""
    flash_attn: str = "off"
    """Flash attention on the llama-cpp engine: auto, on or off."""
    seed: int = 0
    """Seed of the library's own RNG (unused: we sample ourselves)."""
    progress: Callable[[float], None] | None = field(default=None, compare=False)
    """Called with 0..1 while the weights load (on the loading thread)."""


def load_refusal(library: str, path: Path, logged: list[str], current: bool = False) -> str:
    """The sentence for a model ``library`` refused: its own reason and the way out.

    ``current`` marks today's llama.cpp, for which no other engine is the way out.
    """
    reason = refusal_reason(logged)
    why = f": {reason}" if reason else " (run with --llama-log to see its log)"
    fix = ("check that the file is a complete GGUF of a model llama.cpp supports"
           if current else "a current GGUF loads with --engine llama-cpp "
           "(pip install 'infernode[llamacpp]')")
    return f"{library} refused {path}{why}; {fix}"


class ThreadShare:
    """Threads for one evaluation: a fixed count, or the idle cores split among busy slots.

    On ctransformers each slot evaluates on its own threads; a slot alone should use every
    idle core, two busy slots half each. On llama-cpp one batch carries every running
    slot's tokens, so ``busy`` stays 1 and that batch takes every idle core.
    Idle means idle on the machine too: ggml's workers spin at a
    barrier after every operation, so a thread whose core another process holds stalls the
    others (measured on 2 loaded cores: 2 threads took 3-50x as long as 1). Cores other
    processes keep busy are the 1-minute load average less our own evaluating threads,
    checked at most once a second. ``busy`` counts the slots running a turn (the engine
    sets it).
    """

    def __init__(
        self, fixed: int, cores: int | None = None,
        load: Callable[[], float] = lambda: os.getloadavg()[0],
    ) -> None:
        self.fixed = fixed
        self.cores = cores or os.cpu_count() or 1
        self.busy: Callable[[], int] = lambda: 1
        self._load = load
        self._checked = -1.0
        self._free = self.cores
        self._ours = 0

    def threads(self) -> int:
        """Threads for the evaluation about to run."""
        if self.fixed > 0:
            return self.fixed
        busy = max(1, self.busy())
        share = max(1, min(self.cores // busy, self._free_cores()))
        self._ours = share * busy
        return share

    def _free_cores(self) -> int:
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            others = max(0.0, self._load() - self._ours)
            self._free = max(1, int(self.cores - others + 0.5))
        return self._free
