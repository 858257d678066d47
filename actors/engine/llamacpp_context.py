"""One current-llama.cpp context shared by every slot, one sequence per slot.

Each slot's ``LlamaCppSequence`` is a ``BackendContext`` over sequence ``seq_id`` of a single
``llama_context``: the KV cache holds a stream per sequence, snapshots are per-sequence
state (``llama_state_seq_*``), and positions past a reused prefix are dropped with
``llama_memory_seq_rm``.

A llama context is not thread-safe, and slots run on their own worker threads. Calls are
serialised by flat combining: a thread that finds the context idle becomes the combiner and
evaluates every request queued at that moment — its own and other slots' — in one
``llama_decode``. While it decodes, other slots' next tokens queue up; so with several busy
sessions each decode step carries one token of each, at little more than the cost of one.
Before combining, the combiner waits (bounded by a fraction of a decode) for the sequences
that were in the previous step, so those steps stay together instead of alternating.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

_GRACE_CAP_S = 0.005
"""Longest a combiner waits for the previous step's sequences (a fraction of a real decode)."""


class LlamaCppDecodeError(RuntimeError):
    """``llama_decode`` refused a batch."""

    def __init__(self, code: int, n_tokens: int) -> None:
        super().__init__(f"llama_decode failed with code {code} on a batch of {n_tokens} tokens")
        self.code = code
        self.n_tokens = n_tokens


@dataclass(eq=False)
class _Request:
    """Tokens of one sequence to evaluate, and where its result goes."""

    seq: int
    tokens: Sequence[int]
    pos: int
    trim: bool
    """Drop the sequence's cells from ``pos`` on first (a shorter prefix was reused)."""
    logits: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False
    index: int = field(default=-1, repr=False)


@dataclass(frozen=True)
class SharedContextParams:
    """What the shared context is built with."""

    n_seq: int
    """Sequences (slots)."""
    n_ctx_seq: int
    """Tokens each sequence holds."""
    n_batch: int
    """Tokens one prefill request carries at most."""
    threads: int
    """Threads per evaluation."""
    offload_kv: bool
    """Keep the KV cache on the GPU (with offloaded layers)."""


class SharedContext:
    """A llama context whose sequences are the slots; requests to it are combined."""

    def __init__(
        self, lib: ModuleType, model: int, n_vocab: int, params: SharedContextParams
    ) -> None:
        self.lib = lib
        self.n_vocab = n_vocab
        self.params = params
        cp = lib.llama_context_default_params()
        cp.n_ctx = params.n_ctx_seq * params.n_seq
        # Room for one prefill chunk plus a decode token of every other sequence.
        self.capacity = params.n_batch + params.n_seq
        cp.n_batch = self.capacity
        cp.n_ubatch = min(self.capacity, 512)
        cp.n_seq_max = params.n_seq
        cp.n_threads = params.threads
        cp.n_threads_batch = params.threads
        cp.offload_kqv = params.offload_kv
        cp.kv_unified = False  # a stream per sequence: sessions share no prefix
        cp.no_perf = True
        handle = lib.llama_init_from_model(model, cp)
        if not handle:
            raise RuntimeError(
                f"llama.cpp could not create a context of {params.n_seq} x {params.n_ctx_seq} "
                "tokens (out of memory?)"
            )
        self.handle = handle
        self.memory = lib.llama_get_memory(handle)
        self.n_ctx_seq = min(params.n_ctx_seq, int(lib.llama_n_ctx_seq(handle)))
        self._batch = lib.llama_batch_init(self.capacity, 0, 1)
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._busy = False
        self._expected: set[int] = set()
        self._last_decode_s = 0.0
        self.steps = 0
        """llama_decode calls made (for benchmarks)."""
        self.combined = 0
        """Requests evaluated (steps ÷ combined shows how much was batched)."""

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, seq: int, tokens: Sequence[int], pos: int, trim: bool) -> np.ndarray:
        """Evaluate ``tokens`` of ``seq`` at ``pos``…; the logits after the last one."""
        req = _Request(seq, tokens, pos, trim)
        with self._cond:
            self._queue.append(req)
            self._cond.notify_all()  # a combiner waiting for this sequence may go now
            while not req.done and self._busy:
                self._cond.wait()
            combine = not req.done
            if combine:
                self._busy = True
        if combine:
            self._combine(req)
        if req.error is not None:
            raise req.error
        assert req.logits is not None
        return req.logits

    def _combine(self, own: _Request) -> None:
        try:
            while not own.done:
                batch = self._take()
                try:
                    self._run(batch)
                except BaseException as e:  # every request of the batch learns of it
                    for r in batch:
                        r.error = e
                with self._cond:
                    for r in batch:
                        r.done = True
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _take(self) -> list[_Request]:
        """Requests for one decode: FIFO up to capacity, after a short wait for stragglers."""
        with self._cond:
            grace = min(_GRACE_CAP_S, self._last_decode_s / 2)
            deadline = time.monotonic() + grace
            while self._expected - {r.seq for r in self._queue}:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Request] = []
            used = 0
            for r in self._queue:
                if batch and used + len(r.tokens) > self.capacity:
                    break
                batch.append(r)
                used += len(r.tokens)
            del self._queue[: len(batch)]
            self._expected = {r.seq for r in batch if len(r.tokens) == 1}
            return batch

    def _run(self, batch: list[_Request]) -> None:
        lib, b = self.lib, self._batch
        n = 0
        for r in batch:
            if r.trim:
                lib.llama_memory_seq_rm(self.memory, r.seq, r.pos, -1)
            last = len(r.tokens) - 1
            for j, tok in enumerate(r.tokens):
                b.token[n] = tok
                b.pos[n] = r.pos + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = r.seq
                b.logits[n] = j == last
                n += 1
            r.index = n - 1
        b.n_tokens = n
        start = time.perf_counter()
        rc = lib.llama_decode(self.handle, b)
        self._last_decode_s = time.perf_counter() - start
        self.steps += 1
        self.combined += len(batch)
        if rc != 0:
            raise LlamaCppDecodeError(rc, n)
        for r in batch:
            ptr = lib.llama_get_logits_ith(self.handle, r.index)
            r.logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # -- exclusive calls --------------------------------------------------------------------
    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the context alone (state copies, clearing a sequence)."""
        with self._cond:
            while self._busy:
                self._cond.wait()
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def filled(self, seq: int) -> int:
        """Positions ``seq`` holds (caller holds the context)."""
        return int(self.lib.llama_memory_seq_pos_max(self.memory, seq)) + 1

    def close(self) -> None:
        """Free the batch and the context."""
        if self.handle:
            self.lib.llama_batch_free(self._batch)
            self.lib.llama_free(self.handle)
            self.handle = None


class LlamaCppSequence:
    """One slot: sequence ``seq_id`` of a ``SharedContext`` (a ``BackendContext``)."""

    def __init__(self, shared: SharedContext, seq_id: int) -> None:
        self.shared = shared
        self.seq_id = seq_id
        self.n_ctx = shared.n_ctx_seq
        self._filled = 0
        self._logits: np.ndarray | None = None

    def eval(self, tokens: Sequence[int], n_past: int) -> None:
        """Evaluate ``tokens`` at positions ``n_past``…; later positions are discarded."""
        if not tokens:
            return
        step = self.shared.params.n_batch
        trim = n_past < self._filled
        for start in range(0, len(tokens), step):
            chunk = tokens[start : start + step]
            try:
                self._logits = self.shared.evaluate(self.seq_id, chunk, n_past + start, trim)
            except BaseException:
                with self.shared.exclusive():
                    self._filled = self.shared.filled(self.seq_id)
                raise
            trim = False
            self._filled = n_past + start + len(chunk)

    def logits(self) -> np.ndarray:
        """Logits after the last evaluated token."""
        if self._logits is None:
            raise RuntimeError("no token evaluated on this sequence since it was restored")
        return self._logits

    def state_bytes(self) -> bytes:
        """This sequence's KV cells as bytes."""
        lib, ctx = self.shared.lib, self.shared
        with ctx.exclusive():
            size = int(lib.llama_state_seq_get_size(ctx.handle, self.seq_id))
            buf = (ctypes.c_uint8 * size)()
            used = int(lib.llama_state_seq_get_data(ctx.handle, buf, size, self.seq_id))
        if used == 0:
            raise RuntimeError(f"llama.cpp copied no state of sequence {self.seq_id}")
        return ctypes.string_at(buf, used)

    def set_state(self, data: bytes) -> None:
        """Replace this sequence's cells with a state made by ``state_bytes``."""
        lib, ctx = self.shared.lib, self.shared
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        with ctx.exclusive():
            lib.llama_memory_seq_rm(ctx.memory, self.seq_id, -1, -1)
            read = int(lib.llama_state_seq_set_data(ctx.handle, buf, len(data), self.seq_id))
            self._filled = ctx.filled(self.seq_id)
        self._logits = None
        if read != len(data):
            raise RuntimeError(f"state restore read {read} of {len(data)} bytes")

    def close(self) -> None:
        """Drop this sequence's cells (the shared context is freed by the backend)."""
        ctx = self.shared
        if ctx.handle:
            with ctx.exclusive():
                self.shared.lib.llama_memory_seq_rm(ctx.memory, self.seq_id, -1, -1)
        self._filled = 0
