"""Build an engine from settings: read the GGUF header, pick the library, verify restore."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from actors.bank_store import BankStore
from actors.engine import llama_api
from actors.engine.ctransformers_backend import CtransformersBackend
from actors.engine.engine import SlotEngine
from actors.engine.gguf_info import check_runnable, read_gguf_info
from actors.engine.llama_model import ModelParams
from actors.engine.templates import select_template
from actors.engine.verify import verify_in_child

log = structlog.get_logger("engine")


@dataclass(frozen=True)
class EngineSettings:
    """The engine's part of the node configuration."""

    model: Path
    n_slots: int = 2
    n_ctx: int = 2048
    n_batch: int = 512
    threads: int = 0
    gpu_layers: int = 0
    llama_lib: Path | None = None
    chat_template: str = "auto"
    bank_ram_bytes: int = 1 << 30
    bank_session_bytes: int = 256 << 20
    snapshots: bool = True
    verify_restore: bool = True
    llama_log: bool = False
    progress: Callable[[float], None] | None = field(default=None, compare=False)
    """Called with 0..1 while the weights load."""


def load_engine(settings: EngineSettings) -> SlotEngine:
    """Load the model once and make ``n_slots`` slots over it (blocking; call in a thread)."""
    info = read_gguf_info(settings.model)
    check_runnable(info)
    gpu_layers = settings.gpu_layers
    note = ""
    if settings.snapshots and gpu_layers > info.n_layer + 1:
        # Offloading the KV cache makes this llama.cpp restore states wrongly.
        note = (
            f"gpu_layers lowered from {gpu_layers} to {info.n_layer + 1} so the KV cache stays "
            "in host memory, where snapshots restore exactly"
        )
        log.warning("gpu_layers_clamped", requested=gpu_layers, used=info.n_layer + 1)
        gpu_layers = info.n_layer + 1
    cuda = gpu_layers > 0
    lib_path = llama_api.library_path(cuda, settings.llama_lib)
    threads = settings.threads or os.cpu_count() or 1
    params = ModelParams(
        settings.model, settings.n_ctx, settings.n_batch, gpu_layers, threads,
        progress=settings.progress,
    )
    backend = CtransformersBackend(params, lib_path, cuda, settings.llama_log)
    bank: BankStore | None = None
    if settings.snapshots:
        ok, reason = (True, "not verified (--no-verify-restore)")
        if settings.verify_restore:
            ok, reason = verify_in_child(lib_path, settings.model, gpu_layers)
        if ok:
            bank = BankStore(settings.bank_ram_bytes, settings.bank_session_bytes)
        else:
            log.warning("snapshots_disabled", reason=reason)
        note = "; ".join(x for x in (note, reason) if x)
    template = select_template(
        settings.chat_template, info.chat_template, backend.bos_text, backend.eos_text
    )
    engine = SlotEngine(
        backend, template, template.name, settings.n_slots, bank, snapshot_note=note
    )
    log.info(
        "engine_loaded",
        engine=backend.name,
        model=str(settings.model),
        arch=info.architecture,
        desc=backend.description,
        n_ctx=settings.n_ctx,
        slots=settings.n_slots,
        gpu_layers=gpu_layers,
        library=str(lib_path),
        snapshots=bank is not None,
        template=template.name,
    )
    return engine
