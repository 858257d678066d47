"""A loaded llama.cpp model and its contexts, as Python objects over the ctypes binding.

One ``LlamaModel`` holds the weights once; each ``LlamaContext`` is a slot's KV cache over
those shared weights. Every method here blocks: call them from a slot's worker thread.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from actors.engine.backends.ctransformers import api as llama_api
from actors.engine.backends.params import ModelLoadError, ModelParams, ThreadShare, load_refusal


class LlamaModel:
    """The weights, loaded once, shared by every context made from them."""

    def __init__(self, lib: ctypes.CDLL, params: ModelParams) -> None:
        self.lib = lib
        self.params = params
        self.threads = ThreadShare(params.threads)
        cparams = self._context_params()
        report = params.progress
        if report is not None:

            def on_progress(fraction: float, _user: object) -> None:
                try:
                    report(float(fraction))
                except Exception:  # a display problem must never stop a load
                    pass

            callback = llama_api.llama_progress_callback(on_progress)
            cparams.progress_callback = callback
        with llama_api.LOG.capture() as logged:
            handle = lib.llama_load_model_from_file(str(params.path).encode(), cparams)
        if not handle:
            raise ModelLoadError(load_refusal("ctransformers' llama.cpp", params.path, logged))
        self.handle = handle
        self.n_vocab = int(lib.llama_model_n_vocab(handle))
        self.n_ctx_train = int(lib.llama_model_n_ctx(handle))
        self.n_embd = int(lib.llama_model_n_embd(handle))
        buf = ctypes.create_string_buffer(256)
        lib.llama_model_desc(handle, buf, 256)
        self.description = buf.value.decode(errors="replace")
        self.size_bytes = int(lib.llama_model_size(handle))
        self._piece_buf = ctypes.create_string_buffer(64)
        self._pieces: dict[int, bytes] = {}

    def _context_params(self) -> llama_api.LlamaContextParams:
        p = self.lib.llama_context_default_params()
        p.n_ctx = self.params.n_ctx
        p.n_batch = self.params.n_batch
        p.n_gpu_layers = self.params.gpu_layers
        p.seed = self.params.seed
        p.f16_kv = True
        p.logits_all = False
        p.use_mmap = True
        return p

    def new_context(self) -> LlamaContext:
        """Make a context (a KV cache) over these weights."""
        handle = self.lib.llama_new_context_with_model(self.handle, self._context_params())
        if not handle:
            raise ModelLoadError("the llama library could not create a context (out of memory?)")
        return LlamaContext(self, handle)

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        """Token ids of ``text``."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama_api.llama_token * capacity)()
        n = self.lib.llama_tokenize_with_model(self.handle, data, buf, capacity, add_bos)
        if n < 0:  # the buffer was too small; -n is the size needed
            capacity = -n
            buf = (llama_api.llama_token * capacity)()
            n = self.lib.llama_tokenize_with_model(self.handle, data, buf, capacity, add_bos)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """Bytes of one token (cached: the vocabulary never changes)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        n = self.lib.llama_token_to_piece_with_model(self.handle, token, self._piece_buf, 64)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece_with_model(self.handle, token, big, -n)
            raw = big.raw[:n]
        else:
            raw = self._piece_buf.raw[:n]
        self._pieces[token] = raw
        return raw

    def close(self) -> None:
        """Free the weights (after every context is freed)."""
        if self.handle:
            self.lib.llama_free_model(self.handle)
            self.handle = None


class LlamaContext:
    """One KV cache over a shared model; the unit of a slot."""

    def __init__(self, model: LlamaModel, handle: int) -> None:
        self.model = model
        self.lib = model.lib
        self.handle = handle
        self.n_ctx = int(self.lib.llama_n_ctx(handle))
        self.bos = int(self.lib.llama_token_bos(handle))
        self.eos = int(self.lib.llama_token_eos(handle))
        self._state_buf: ctypes.Array[ctypes.c_uint8] | None = None

    def eval(self, tokens: Sequence[int], n_past: int) -> None:
        """Evaluate ``tokens`` at positions ``n_past`` onward, in batches."""
        batch = self.model.params.n_batch
        threads = self.model.threads.threads()
        for start in range(0, len(tokens), batch):
            chunk = tokens[start : start + batch]
            arr = (llama_api.llama_token * len(chunk))(*chunk)
            rc = self.lib.llama_eval(self.handle, arr, len(chunk), n_past + start, threads)
            if rc != 0:
                raise RuntimeError(f"llama_eval failed with code {rc}")

    def logits(self) -> np.ndarray:
        """Logits of the last evaluated token (a copy)."""
        ptr = self.lib.llama_get_logits(self.handle)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def state_bytes(self) -> bytes:
        """The whole context state (KV cache, logits, RNG) as bytes."""
        size = self.lib.llama_get_state_size(self.handle)
        # The maximum state size is large (the whole KV cache); reuse one buffer per context.
        if self._state_buf is None or len(self._state_buf) < size:
            self._state_buf = (ctypes.c_uint8 * size)()
        used = self.lib.llama_copy_state_data(self.handle, self._state_buf)
        return ctypes.string_at(self._state_buf, used)

    def set_state(self, data: bytes) -> None:
        """Restore a state made by ``state_bytes`` on a context of the same model."""
        # llama_set_state_data only reads its input: point it at the bytes, no copy (a state
        # is tens of MiB, and copying it first cost ten times the restore itself).
        src = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        read = self.lib.llama_set_state_data(self.handle, src)
        if read != len(data):
            raise RuntimeError(f"state restore read {read} of {len(data)} bytes")

    def close(self) -> None:
        """Free the context."""
        if self.handle:
            self.lib.llama_free(self.handle)
            self.handle = None
