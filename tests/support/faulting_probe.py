"""A probe child that behaves like llama.cpp on a CPU that reports AMX but faults on it.

ggml asks for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``) and uses AMX when it
gets it; on such a CPU the first multi-token batch then dies with SIGSEGV. This child does the
same: it asks, and crashes the same way unless the permission was refused (EPERM). With
``always`` as its argument it crashes in any case, like a library that cannot run here at all;
with ``raise`` it fails as a library that is missing does, with a Python exception.

    python -m tests.support.faulting_probe [always|raise] [--restore] [--refuse-amx]
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator

from actors.engine import amx
from actors.engine.probe import Stage, child_main


def check(args: list[str], restore: bool) -> Iterator[Stage]:
    """Crash as the faulting CPU does, or report both stages passed."""
    if "raise" in args:
        raise RuntimeError("cannot open libexample.so")
    if "always" in args or not amx.xcomp_perm_refused():
        ctypes.string_at(0)  # SIGSEGV, as the AMX kernels do
    yield {"stage": "eval", "tokens": 12}
    if restore:
        yield {"stage": "restore", "ok": True, "max_diff": 0.0, "nbytes": 1}


if __name__ == "__main__":
    child_main(sys.argv[1:], check)
