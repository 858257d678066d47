"""How long each slot's context is when ``--ctx`` is left at 0 (auto).

An agent's first prompt (system prompt and tool definitions) is often 20k tokens, so the
default is the context the model was trained for (``<arch>.context_length`` in its GGUF
header), as llama.cpp's own ``n_ctx = 0`` takes it. The KV cache of every slot must fit in
memory beside everything else, so the context is cut to what half of the memory available
at start holds for all slots (rounded down to a power of two, so a restart finds the same
length and its banked snapshots still fit); the start log says which of the two decided it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from actors.engine.gguf_info import GgufInfo

FALLBACK_CTX = 2048
"""Context of a model whose header names no trained context."""
KV_BYTES_PER_VALUE = 2
"""The cache holds f16 keys and values (both engines' default cache type)."""
MEMORY_SHARE = 0.5
"""Share of the available memory the KV caches of all slots may take."""
MIN_CTX = 256
"""The smallest context chosen automatically, however little memory there is."""


@dataclass(frozen=True)
class ContextChoice:
    """The context length of each slot, and why it is that long."""

    n_ctx: int
    """Tokens per slot."""
    reason: str
    """For the start log: where the length comes from and what its KV cache takes."""


def kv_bytes_per_token(info: GgufInfo) -> int:
    """Bytes of KV cache one token takes across all layers (keys and values, f16)."""
    heads = info.n_head or 1
    head_dim = (info.n_embd or 0) // heads
    kv_heads = info.n_head_kv or heads
    width = kv_heads * ((info.key_length or head_dim) + (info.value_length or head_dim))
    return max(1, info.n_layer * width * KV_BYTES_PER_VALUE)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable``), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose_context(
    requested: int, info: GgufInfo, n_slots: int, available: int | None
) -> ContextChoice:
    """``requested`` when set, else the trained context bounded by ``available`` memory."""
    per_token = kv_bytes_per_token(info)
    if requested:
        kv = _size(requested * n_slots * per_token)
        return ContextChoice(requested, f"--ctx; KV {kv} for {n_slots} slots")
    trained = info.context_length or 0
    wanted = trained or FALLBACK_CTX
    source = "trained context" if trained else "the header names no trained context"
    kv = _size(wanted * n_slots * per_token)
    if available is None:
        return ContextChoice(wanted, f"{source}; KV {kv} for {n_slots} slots; free memory "
                                     "unknown")
    budget = int(available * MEMORY_SHARE)
    fits = budget // (n_slots * per_token)
    if fits >= wanted:
        return ContextChoice(wanted, f"{source}; KV {kv} for {n_slots} slots")
    # A power of two: the free memory differs a little at every start, and a context that
    # changed with it would leave every banked snapshot (keyed by n_ctx) unusable.
    n_ctx = max(MIN_CTX, 1 << (max(fits, 1).bit_length() - 1))
    return ContextChoice(n_ctx, (
        f"bounded by RAM: {wanted} tokens ({source}) need KV {kv} for {n_slots} slots, "
        f"half of the {_size(available)} available holds {n_ctx}; pass --ctx to choose"
    ))


def _size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 20):.0f} MiB"
