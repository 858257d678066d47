"""ctypes binding of the llama.cpp C API that ctransformers 0.2.27's library exports.

The prototypes follow ``models/ggml/llama.h`` of the ctransformers 0.2.27 sdist (llama.cpp of
2023-09). ctransformers' own ``LLM`` class hides this API; binding it directly gives one
model shared by many contexts, KV state as bytes, and raw logits for our own sampling.
"""

from __future__ import annotations

import ctypes
import os
import platform
from ctypes import (
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_float,
    c_int,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path

from actors.engine.backends.params import LlamaLibraryError
from actors.engine.library_log import LibraryLog

llama_token = c_int
llama_model_p = c_void_p
llama_context_p = c_void_p
llama_progress_callback = ctypes.CFUNCTYPE(None, c_float, c_void_p)
llama_log_callback = ctypes.CFUNCTYPE(None, c_int, c_char_p, c_void_p)


class LlamaContextParams(Structure):
    """``struct llama_context_params`` of the bundled llama.cpp."""

    _fields_ = [
        ("seed", c_uint32),
        ("n_ctx", c_int32),
        ("n_batch", c_int32),
        ("n_gpu_layers", c_int32),
        ("main_gpu", c_int32),
        ("tensor_split", POINTER(c_float)),
        ("rope_freq_base", c_float),
        ("rope_freq_scale", c_float),
        ("progress_callback", llama_progress_callback),
        ("progress_callback_user_data", c_void_p),
        ("low_vram", c_bool),
        ("mul_mat_q", c_bool),
        ("f16_kv", c_bool),
        ("logits_all", c_bool),
        ("vocab_only", c_bool),
        ("use_mmap", c_bool),
        ("use_mlock", c_bool),
        ("embedding", c_bool),
    ]


_PROTOTYPES: dict[str, tuple[object, list[object]]] = {
    "llama_backend_init": (None, [c_bool]),
    "llama_context_default_params": (LlamaContextParams, []),
    "llama_load_model_from_file": (llama_model_p, [c_char_p, LlamaContextParams]),
    "llama_free_model": (None, [llama_model_p]),
    "llama_new_context_with_model": (llama_context_p, [llama_model_p, LlamaContextParams]),
    "llama_free": (None, [llama_context_p]),
    "llama_n_vocab": (c_int, [llama_context_p]),
    "llama_n_ctx": (c_int, [llama_context_p]),
    "llama_model_n_vocab": (c_int, [llama_model_p]),
    "llama_model_n_ctx": (c_int, [llama_model_p]),
    "llama_model_n_embd": (c_int, [llama_model_p]),
    "llama_model_desc": (c_int, [llama_model_p, c_char_p, c_size_t]),
    "llama_model_size": (c_uint64, [llama_model_p]),
    "llama_model_n_params": (c_uint64, [llama_model_p]),
    "llama_get_kv_cache_token_count": (c_int, [llama_context_p]),
    "llama_get_state_size": (c_size_t, [llama_context_p]),
    "llama_copy_state_data": (c_size_t, [llama_context_p, POINTER(c_uint8)]),
    "llama_set_state_data": (c_size_t, [llama_context_p, POINTER(c_uint8)]),
    "llama_eval": (c_int, [llama_context_p, POINTER(llama_token), c_int, c_int, c_int]),
    "llama_get_logits": (POINTER(c_float), [llama_context_p]),
    "llama_token_bos": (llama_token, [llama_context_p]),
    "llama_token_eos": (llama_token, [llama_context_p]),
    "llama_tokenize_with_model": (
        c_int,
        [llama_model_p, c_char_p, POINTER(llama_token), c_int, c_bool],
    ),
    "llama_token_to_piece_with_model": (c_int, [llama_model_p, llama_token, c_char_p, c_int]),
    "llama_token_get_text": (c_char_p, [llama_context_p, llama_token]),
    "llama_token_get_type": (c_int, [llama_context_p, llama_token]),
    "llama_log_set": (None, [llama_log_callback, c_void_p]),
    "llama_print_system_info": (c_char_p, []),
}


def _ctransformers_lib_dir() -> Path:
    try:
        import ctransformers
    except ImportError as e:
        raise LlamaLibraryError(
            "ctransformers is not installed; install it with `pip install ctransformers==0.2.27`"
        ) from e
    return Path(ctransformers.__file__).parent / "lib"


def _cpu_variant() -> str:
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    if " avx2" in flags:
        return "avx2"
    if " avx" in flags:
        return "avx"
    return "basic"


def library_path(cuda: bool, override: Path | None = None) -> Path:
    """Path of the library to load: ``override``, else ctransformers' CUDA or CPU build."""
    if override is not None:
        if not override.is_file():
            raise LlamaLibraryError(f"llama library {override} does not exist")
        return override
    name = {"Darwin": "libctransformers.dylib", "Windows": "ctransformers.dll"}.get(
        platform.system(), "libctransformers.so"
    )
    variant = "cuda" if cuda else _cpu_variant()
    path = _ctransformers_lib_dir() / variant / name
    if not path.is_file():
        raise LlamaLibraryError(f"ctransformers ships no {variant} library at {path}")
    return path


def _preload_cuda_runtime() -> None:
    """Load the CUDA runtime wheels (``nvidia-*-cu12``) so the CUDA library finds them."""
    try:
        import nvidia  # namespace package of the nvidia-*-cu12 wheels
    except ImportError:
        return
    for base in getattr(nvidia, "__path__", []):
        for sub in ("cuda_runtime", "cublas"):
            for lib in sorted((Path(base) / sub / "lib").glob("lib*.so*")):
                try:
                    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass


_LOADED: dict[Path, ctypes.CDLL] = {}


def load_library(path: Path, cuda: bool = False, verbose: bool = False) -> ctypes.CDLL:
    """Load and bind the library at ``path`` once per process.

    ``verbose`` passes llama.cpp's own log lines through to stderr.
    """
    global _VERBOSE
    _VERBOSE = _VERBOSE or verbose
    path = path.resolve()
    if path in _LOADED:
        return _LOADED[path]
    if platform.system() == "Linux":
        # A library built from the sdist on a current toolchain is not linked against
        # libstdc++ and crashes in llama_copy_state_data unless it is already global.
        try:
            ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass
    if cuda:
        _preload_cuda_runtime()
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        hint = (
            " (the CUDA library needs libcudart.so.12 and libcublas.so.12: "
            "`pip install 'ctransformers[cuda]==0.2.27'` or a CUDA 12 toolkit)"
            if cuda
            else ""
        )
        raise LlamaLibraryError(f"cannot load {path}: {e}{hint}") from e
    missing = [name for name in _PROTOTYPES if not hasattr(lib, name)]
    if missing:
        raise LlamaLibraryError(
            f"{path} does not export the llama.cpp API this binding needs: {', '.join(missing)}"
        )
    for name, (restype, argtypes) in _PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    lib.llama_log_set(_SILENT_LOG, None)
    lib.llama_backend_init(False)
    _LOADED[path] = lib
    return lib


LOG = LibraryLog()
"""What this library logs, for quoting its reason when it refuses a model."""


@llama_log_callback
def _silent_log(level: int, text: bytes | None, user_data: int | None) -> None:
    """Keep llama.cpp's log lines for ``LOG``; print them only when asked for them."""
    if not text:
        return
    LOG.write(text.decode("utf-8", errors="replace"))
    if _VERBOSE:
        os.write(2, text)


_SILENT_LOG = _silent_log
_VERBOSE = False
