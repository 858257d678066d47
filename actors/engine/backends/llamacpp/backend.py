"""The second backend: current llama.cpp through llama-cpp-python's low-level bindings.

It runs today's GGUF architectures (qwen2, gemma, phi3, …) and the current CUDA kernels.
One model and one context serve every slot: slot ``i`` is sequence ``i`` of that context
(see ``backends/llamacpp/context.py``). Tokenising, special tokens and splicing go through the same
``PromptTokenizer`` as the default backend, so both engines build the same prompt ids.

llama-cpp-python is an optional extra: ``pip install 'infernode[llamacpp]'``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from actors.engine.backends.llamacpp.context import (
    LlamaCppSequence,
    SharedContext,
    SharedContextParams,
)
from actors.engine.backends.params import (
    LlamaLibraryError,
    ModelLoadError,
    ModelParams,
    load_refusal,
)
from actors.engine.gguf_info import model_id_of
from actors.engine.library_log import LibraryLog
from actors.engine.tokenizer import PromptTokenizer

INSTALL_HINT = "pip install 'infernode[llamacpp]'"
_ATTR_CONTROL, _ATTR_USER_DEFINED = 1 << 3, 1 << 4
_NULL_TOKEN = -1
_LOG_CALLBACK: object = None
"""The log callback handed to llama.cpp; kept referenced for the life of the process."""
LOG = LibraryLog()
"""What llama.cpp logs, for quoting its reason when it refuses a model."""
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
"""``--flash-attn`` values as llama.cpp's ``llama_flash_attn_type``."""


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python can be imported."""
    try:
        _load_isolated()
        importlib.import_module("llama_cpp.llama_cpp")
    except Exception:  # ImportError, or its shared library failing to load
        return False
    return True


def bindings(verbose: bool = False) -> ModuleType:
    """llama-cpp-python's ctypes module, with llama.cpp's log routed (or silenced)."""
    try:
        _load_isolated()
        lib = importlib.import_module("llama_cpp.llama_cpp")
    except ImportError as e:
        raise LlamaLibraryError(
            f"--engine llama-cpp needs llama-cpp-python, which is not installed: {INSTALL_HINT} "
            "(add CMAKE_ARGS=\"-DGGML_CUDA=on\" to build it for CUDA)"
        ) from e
    except OSError as e:
        raise LlamaLibraryError(f"llama-cpp-python's library failed to load: {e}") from e
    _route_log(lib, verbose)
    lib.llama_backend_init()
    return lib


def _load_isolated() -> None:
    """Load libllama so that it resolves ggml and gguf symbols to its own copies.

    ctransformers' library is loaded globally and exports the 2023 ggml/gguf functions under
    the same names; a libllama loaded after it would call those (and reject every model).
    Loaded first with RTLD_DEEPBIND, libllama and its ggml libraries prefer their own
    symbols; llama-cpp-python's own load then finds it already there.
    """
    deepbind = getattr(os, "RTLD_DEEPBIND", 0)
    spec = importlib.util.find_spec("llama_cpp")
    if not deepbind or spec is None or spec.origin is None:
        return
    path = Path(spec.origin).parent / "lib" / "libllama.so"
    if path.is_file():
        ctypes.CDLL(str(path), mode=os.RTLD_LOCAL | deepbind)


def _route_log(lib: ModuleType, verbose: bool) -> None:
    global _LOG_CALLBACK

    def on_log(_level: int, text: bytes | None, _user: object) -> None:
        if not text:
            return
        decoded = text.decode("utf-8", errors="replace")
        LOG.write(decoded)
        if verbose:
            sys.stderr.write(decoded)

    _LOG_CALLBACK = lib.llama_log_callback(on_log)
    lib.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def _progress_callback(lib: ModuleType, params: ModelParams) -> object:
    """llama.cpp's load-progress callback reporting to ``params.progress``, if any."""
    report = params.progress
    if report is None:
        return None

    def on_progress(fraction: float, _user: object) -> bool:
        with contextlib.suppress(Exception):  # a display problem must never stop a load
            report(float(fraction))
        return True

    return lib.llama_progress_callback(on_progress)


class LlamaCppBackend:
    """Shared weights, one context, a sequence per slot (a ``Backend``)."""

    name = "llama-cpp"

    def __init__(self, params: ModelParams, n_seq: int, verbose: bool = False) -> None:
        self.lib = lib = bindings(verbose)
        self.params = params
        self._progress_cb = _progress_callback(lib, params)
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = params.gpu_layers
        if self._progress_cb is not None:
            mp.progress_callback = self._progress_cb
        with LOG.capture() as logged:
            self.model = lib.llama_model_load_from_file(str(params.path).encode(), mp)
        if not self.model:
            raise ModelLoadError(load_refusal("llama.cpp", params.path, logged, current=True))
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_ctx = params.n_ctx
        self._path = params.path
        buf = ctypes.create_string_buffer(256)
        lib.llama_model_desc(self.model, buf, 256)
        self.description = buf.value.decode(errors="replace")
        self.bos_id = int(lib.llama_vocab_bos(self.vocab))
        self.eos_id = int(lib.llama_vocab_eos(self.vocab))
        specials, self.eog_ids = self._scan_vocab()
        texts = {tok: text for text, tok in specials.items()}
        self.bos_text = texts.get(self.bos_id, "")
        self.eos_text = texts.get(self.eos_id, "")
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self.tokenizer = PromptTokenizer(
            self._tokenize, specials, self.bos_id, self._adds_space_prefix(),
            adds_bos=bool(lib.llama_vocab_get_add_bos(self.vocab)) and self.bos_id != _NULL_TOKEN,
        )
        try:
            self.shared = SharedContext(
                lib, self.model, self.n_vocab,
                SharedContextParams(
                    n_seq=n_seq, n_ctx_seq=params.n_ctx, n_batch=params.n_batch,
                    threads=params.threads, offload_kv=params.gpu_layers != 0,
                    flash_attn=FLASH_ATTN[params.flash_attn],
                ),
                LOG,
            )
        except RuntimeError as e:
            lib.llama_model_free(self.model)
            raise ModelLoadError(str(e)) from e
        self.n_ctx = min(self.n_ctx, self.shared.n_ctx_seq)
        self._free_seqs = list(range(n_seq))

    @functools.cached_property
    def model_id(self) -> str:
        """Identity of the weights (a hash of the whole file: computed when first asked, so a
        probe child that never banks never reads the file). Current llama.cpp's model and KV
        formats differ from the default engine's: a snapshot of one is never offered to the
        other."""
        return f"{model_id_of(self._path)}+{self.name}"

    def _scan_vocab(self) -> tuple[dict[str, int], frozenset[int]]:
        """Control and user-defined token texts, and every end-of-generation token."""
        lib, vocab = self.lib, self.vocab
        specials: dict[str, int] = {}
        eog: set[int] = set()
        for tok in range(self.n_vocab):
            if lib.llama_vocab_is_eog(vocab, tok):
                eog.add(tok)
            if lib.llama_vocab_get_attr(vocab, tok) & (_ATTR_CONTROL | _ATTR_USER_DEFINED):
                raw = lib.llama_vocab_get_text(vocab, tok)
                text = raw.decode("utf-8", errors="replace") if raw else ""
                if text:
                    specials[text] = tok
        if self.eos_id != _NULL_TOKEN:
            eog.add(self.eos_id)
        return specials, frozenset(eog)

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (self.lib.llama_token * capacity)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, False)
        if n < 0:  # the buffer was too small; -n is the size needed
            capacity = -n
            buf = (self.lib.llama_token * capacity)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, False)
        return list(buf[:n])

    def _adds_space_prefix(self) -> bool:
        # SentencePiece vocabularies may prefix every tokenizer call with a space.
        first = self._tokenize("a", False)
        return bool(first) and self.piece(first[0]).startswith(b" ")

    def piece(self, token: int) -> bytes:
        """Bytes of one token; control tokens spelled as their text, BOS as nothing."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        if token == self.bos_id:
            raw = b""
        else:
            lib, buf = self.lib, self._piece_buf
            n = lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            raw = buf.raw[:n]
        self._pieces[token] = raw
        return raw

    def new_context(self) -> LlamaCppSequence:
        """The next free sequence of the shared context (one per slot)."""
        if not self._free_seqs:
            raise RuntimeError(
                f"the llama.cpp context was made for {self.shared.params.n_seq} slots"
            )
        return LlamaCppSequence(self.shared, self._free_seqs.pop(0))

    def close(self) -> None:
        """Free the context, then the weights."""
        self.shared.close()
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None
