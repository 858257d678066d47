"""Build an engine from settings: read the GGUF header, pick the engine, verify restore.

Two engines sit behind the same ``Backend`` interface: current llama.cpp through
llama-cpp-python (an optional extra) and ctransformers' bundled llama.cpp of 2023 (always
installed). ``auto``, the default, takes llama-cpp whenever it is installed (it was faster
on every model measured, see bench/engines_compare.py), else ctransformers when the GGUF
header says its library reads the file, else refuses at once with the cause and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import structlog

from actors.engine.backends.ctransformers import api as llama_api
from actors.engine.backends.ctransformers import verify as ctransformers_verify
from actors.engine.backends.ctransformers.backend import CtransformersBackend
from actors.engine.backends.llamacpp import verify as llamacpp_verify
from actors.engine.backends.llamacpp.backend import (
    INSTALL_HINT,
    LlamaCppBackend,
    llama_cpp_available,
)
from actors.engine.backends.params import ModelParams
from actors.engine.bank.domains import LOCAL_USER, parse_share_groups
from actors.engine.bank.store import BankStore
from actors.engine.context_size import available_memory, choose_context
from actors.engine.engine import SlotEngine
from actors.engine.gguf_info import (
    GgufInfo,
    UnsupportedModelError,
    check_runnable,
    ctransformers_refusal,
    read_gguf_info,
)
from actors.engine.interface import Backend, end_of_generation
from actors.engine.probe import ProbeVerdict, probe_engine
from actors.engine.templates.choice import select_template, turn_stops
from schemas.chat import OverflowPolicy

log = structlog.get_logger("engine")


class EngineSettings(Protocol):
    """The engine's part of the node configuration (``node.config.NodeConfig`` is one).

    Read-only, and without values of its own: every default lives in the node's config.
    """

    @property
    def model(self) -> Path | None: ...
    @property
    def engine(self) -> str: ...
    @property
    def n_slots(self) -> int: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def n_batch(self) -> int: ...
    @property
    def threads(self) -> int: ...
    @property
    def gpu_layers(self) -> int: ...
    @property
    def llama_lib(self) -> Path | None: ...
    @property
    def chat_template(self) -> str: ...
    @property
    def overflow(self) -> str: ...
    @property
    def bank_ram_bytes(self) -> int: ...
    @property
    def bank_session_bytes(self) -> int: ...
    @property
    def bank_share_groups(self) -> str: ...
    @property
    def nats_url(self) -> str | None: ...
    @property
    def verify_restore(self) -> bool: ...
    @property
    def llama_log(self) -> bool: ...
    @property
    def flash_attn(self) -> str: ...
    @property
    def speculate(self) -> str: ...


Progress = Callable[[float], None]
"""Called with 0..1 while the weights load."""


class LlamaCppMissingError(UnsupportedModelError):
    """``auto`` found a file only current llama.cpp reads, and it is not installed."""

    def __init__(self, info: GgufInfo, reason: str) -> None:
        ValueError.__init__(
            self,
            f"{info.path}: no installed engine can load this model: {reason}, which the "
            "ctransformers engine (llama.cpp of 2023-09) lacks, and the llama-cpp engine is "
            f"not installed; install it with {INSTALL_HINT} and start again (it picks "
            "--engine llama-cpp by itself)",
        )
        self.path = info.path
        self.architecture = info.architecture
        self.reason = reason


def _default_domain(settings: EngineSettings) -> str | None:
    """On the embedded server (no ``nats_url``) every client is one NATS user: one domain."""
    return LOCAL_USER if settings.nats_url is None else None


def choose_engine(requested: str, info: GgufInfo) -> str:
    """The engine that runs ``info``'s model: ``requested``, or for ``auto`` the fitting one."""
    if requested == "auto":
        if llama_cpp_available():
            return "llama-cpp"
        reason = ctransformers_refusal(info)
        if reason is not None:
            raise LlamaCppMissingError(info, reason)
        return "ctransformers"
    if requested == "ctransformers":
        check_runnable(info)
    elif requested != "llama-cpp":
        raise ValueError(f"unknown engine {requested!r}: choose auto, llama-cpp or ctransformers")
    return requested


def default_threads(engine: str, cores: int | None = None) -> int:
    """Threads one evaluation takes on an idle machine when none are configured; 0 means
    "split among the busy slots".

    llama-cpp evaluates every slot in one ``llama_decode`` at a time, which takes all the
    (idle) cores. ctransformers evaluates each slot on its own threads: the idle cores are shared
    among the slots busy at that moment (``ThreadShare``), so one session alone gets them.
    """
    return (cores or os.cpu_count() or 1) if engine == "llama-cpp" else 0


LLAMA_CPP_BATCH = 2048
"""llama-server's default ``--batch-size``; llama.cpp evaluates it in micro-batches of 512."""
CTRANSFORMERS_BATCH = 512
"""ctransformers' llama.cpp has no micro-batches: its scratch buffers grow with the batch."""


def default_batch(engine: str) -> int:
    """Prompt tokens per evaluation when ``--batch`` is 0 (the default)."""
    return LLAMA_CPP_BATCH if engine == "llama-cpp" else CTRANSFORMERS_BATCH


def threads_said(engine: str, threads: int, cores: int | None = None) -> str:
    """The thread choice as the start log says it."""
    if threads:
        return f"{threads} per evaluation (--threads)"
    if engine == "llama-cpp":
        return (f"every idle core of {default_threads(engine, cores)}, for the one batch "
                "all running sessions share")
    return f"the idle cores of {cores or os.cpu_count() or 1}, split among the slots evaluating"


@dataclass(frozen=True)
class _Load:
    """One load: the settings and what is resolved from them before the weights load."""

    settings: EngineSettings
    model: Path
    threads: int
    n_batch: int
    """Prompt tokens per evaluation: ``--batch``, or the engine's own."""
    progress: Progress | None
    n_ctx: int
    """Each slot's context: ``--ctx``, or the one ``choose_context`` chose."""

    @property
    def snapshots(self) -> bool:
        """A bank with room (``bank_ram_bytes`` > 0) is what turns snapshots on."""
        return self.settings.bank_ram_bytes > 0

    def params(self, gpu_layers: int) -> ModelParams:
        s = self.settings
        return ModelParams(
            self.model, self.n_ctx, self.n_batch, gpu_layers, self.threads,
            flash_attn=s.flash_attn, progress=self.progress,
        )


def load_engine(settings: EngineSettings, progress: Progress | None = None) -> SlotEngine:
    """Load the model once and make ``n_slots`` slots over it (blocking; call in a thread)."""
    if settings.model is None:
        raise ValueError("no model file to load: pass --model PATH.gguf")
    info = read_gguf_info(settings.model)
    engine = choose_engine(settings.engine, info)
    # 0 reaches both engines as "decided per evaluation from the idle cores".
    threads = settings.threads
    n_batch = settings.n_batch or default_batch(engine)
    context = choose_context(settings.n_ctx, info, settings.n_slots, available_memory())
    log.info("context_chosen", n_ctx=context.n_ctx, reason=context.reason)
    load = _Load(settings, settings.model, threads, n_batch, progress, context.n_ctx)
    if engine == "llama-cpp":
        backend, (snapshots, note), library = _load_llamacpp(load)
        gpu_layers = settings.gpu_layers
    else:
        backend, (snapshots, note), library, gpu_layers = _load_ctransformers(load, info)
    bank: BankStore | None = None
    if snapshots:
        bank = BankStore(
            settings.bank_ram_bytes, settings.bank_session_bytes,
            parse_share_groups(settings.bank_share_groups, _default_domain(settings)),
        )
    specials = backend.tokenizer.specials
    template = select_template(
        settings.chat_template, info.chat_template, backend.bos_text, backend.eos_text, specials
    )
    stops = turn_stops(template, specials, end_of_generation(backend))
    slot_engine = SlotEngine(
        backend, template, template.name, settings.n_slots, bank, snapshot_note=note,
        overflow=cast(OverflowPolicy, settings.overflow),
        stops=stops, speculate=speculation_for(settings.speculate, gpu_layers), n_batch=n_batch,
    )
    log.info(
        "engine_loaded",
        engine=backend.name,
        model=str(settings.model),
        arch=info.architecture,
        desc=backend.description,
        n_ctx=backend.n_ctx,
        slots=settings.n_slots,
        gpu_layers=gpu_layers,
        library=library,
        snapshots=bank is not None,
        template=template.name,
        turn_stops=list(stops),
        threads=threads_said(engine, threads),
        flash_attn=_flash_said(engine, settings.flash_attn),
        n_batch=n_batch,
        n_ubatch=backend_ubatch(backend, n_batch),
        speculate=f"n-gram, up to {slot_engine.draft} tokens" if slot_engine.draft else "off",
    )
    return slot_engine


def _flash_said(engine: str, setting: str) -> str:
    if engine != "llama-cpp":
        return "n/a (ctransformers has none)"
    return "auto (on where llama.cpp supports it)" if setting == "auto" else setting


def speculation_for(setting: str, gpu_layers: int) -> str:
    """``on`` or ``off`` for ``--speculate``: ``auto`` speculates where the model runs on a
    GPU, where verifying a batch of proposed tokens costs about one token. On a CPU each
    verified token costs almost a decode step (measured on SmolLM2: 0.8-1.2x the speed
    without it), and llama.cpp's batch logits differ slightly from a lone token's, so a
    greedy reply on a quantized model could leave the tokens a plain decode gives."""
    if setting == "auto":
        return "on" if gpu_layers > 0 else "off"
    return setting


def backend_ubatch(backend: Backend, n_batch: int) -> int:
    """Tokens one graph evaluates: llama-cpp's micro-batch, else the whole batch."""
    shared = getattr(backend, "shared", None)
    return int(getattr(shared, "n_ubatch", n_batch))


def probe_llamacpp(model: Path, gpu_layers: int = 0, restore: bool = False) -> ProbeVerdict:
    """Probe the llama-cpp engine on ``model`` in a child (refusing this process AMX where that
    makes it run; see ``actors.engine.probe``). For code that loads llama.cpp itself, or starts
    another llama.cpp server: a child process inherits the refusal."""
    args = llamacpp_verify.probe_args(model, gpu_layers)
    return probe_engine("llama-cpp", llamacpp_verify.__name__, args, model, restore)


def _restore(load: _Load) -> bool:
    """Whether the probe also checks that a restored state gives the live logits."""
    return load.snapshots and load.settings.verify_restore


def _snapshots(load: _Load, verdict: ProbeVerdict) -> tuple[bool, str]:
    """Whether snapshots are on, and why (the probe's restore verdict)."""
    if not load.snapshots:
        return False, ""
    if not verdict.evaluated:  # the node's own load raises the probe's error, typed
        return False, verdict.reason
    if not _restore(load):
        return True, "not verified (--no-verify-restore)"
    if not verdict.restore_ok:
        log.warning("snapshots_disabled", reason=verdict.reason)
    return bool(verdict.restore_ok), verdict.reason


def _load_llamacpp(load: _Load) -> tuple[Backend, tuple[bool, str], str]:
    settings = load.settings
    params = load.params(settings.gpu_layers)
    if settings.llama_lib is not None:
        log.warning(
            "llama_lib_ignored", library=str(settings.llama_lib),
            reason="the llama-cpp engine runs llama-cpp-python's own library",
        )
    # Probed before loading: the probe's own copy of the weights must not sit beside ours,
    # and a library that crashes on this CPU must not take the node with it.
    snapshots = _snapshots(load, probe_llamacpp(load.model, settings.gpu_layers, _restore(load)))
    backend = LlamaCppBackend(params, settings.n_slots, settings.llama_log)
    return backend, snapshots, "llama-cpp-python"


def _load_ctransformers(
    load: _Load, info: GgufInfo
) -> tuple[Backend, tuple[bool, str], str, int]:
    settings = load.settings
    gpu_layers = settings.gpu_layers
    if settings.flash_attn == "on":
        log.warning("flash_attn_ignored", reason="the ctransformers engine has no flash attention")
    clamp = ""
    if load.snapshots and gpu_layers > info.n_layer + 1:
        # Offloading the KV cache makes this llama.cpp restore states wrongly.
        clamp = (
            f"gpu_layers lowered from {gpu_layers} to {info.n_layer + 1} so the KV cache stays "
            "in host memory, where snapshots restore exactly"
        )
        log.warning("gpu_layers_clamped", requested=gpu_layers, used=info.n_layer + 1)
        gpu_layers = info.n_layer + 1
    cuda = gpu_layers > 0
    lib_path = llama_api.library_path(cuda, settings.llama_lib)
    args = ctransformers_verify.probe_args(lib_path, load.model, gpu_layers)
    verdict = probe_engine(
        "ctransformers", ctransformers_verify.__name__, args, load.model, _restore(load)
    )
    ok, reason = _snapshots(load, verdict)
    backend = CtransformersBackend(load.params(gpu_layers), lib_path, cuda, settings.llama_log)
    note = "; ".join(x for x in (clamp, reason) if x)
    return backend, (ok, note), str(lib_path), gpu_layers
