"""One current-llama.cpp context shared by every slot, one sequence per slot.

Each slot's ``LlamaCppSequence`` is a ``BackendContext`` over sequence ``seq_id`` of a single
``llama_context``: the KV cache holds a stream per sequence, snapshots are per-sequence
state (``llama_state_seq_*``), and positions past a reused prefix are dropped with
``llama_memory_seq_rm``.

A llama context is not thread-safe, and slots run on their own worker threads. So one
long-lived decode thread owns the context: slots hand it requests and wait. Each step it
evaluates every request queued at that moment — one slot's prefill chunk, other slots' next
tokens — in one ``llama_decode``; with several busy sessions each step carries a token of
each, at little more than the cost of one. Before a step it waits, bounded by a fraction of
a decode, for the sequences of the previous step, so they stay together instead of
alternating. One thread also keeps llama.cpp's OpenMP workers to one team: a team per
calling thread would leave the previous caller's workers spinning beside the next.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from actors.engine.backends.params import ThreadShare
from actors.engine.library_log import LibraryLog, summary

UBATCH = 512
"""Tokens one graph evaluates (llama-server's ``--ubatch-size``); a longer batch runs as
several."""
_GRACE_CAP_S = 0.005
"""Longest the decode thread waits for the previous step's sequences."""


class LlamaCppDecodeError(RuntimeError):
    """``llama_decode`` refused a batch."""

    def __init__(self, code: int, n_tokens: int, detail: str = "") -> None:
        super().__init__(
            f"llama_decode failed with code {code} on a batch of {n_tokens} tokens"
            + (f": {detail}" if detail else "")
        )
        self.code = code
        self.n_tokens = n_tokens


@dataclass(eq=False)
class _Work:
    """Something for the decode thread; the submitting thread waits on ``finished``."""

    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    error: BaseException | None = None


@dataclass(eq=False)
class _Eval(_Work):
    """Tokens of one sequence to evaluate; gets the logits after the last one, or after
    each one with ``every``."""

    seq: int = 0
    tokens: Sequence[int] = ()
    pos: int = 0
    trim: bool = False
    """Drop the sequence's cells from ``pos`` on first (a shorter prefix was reused)."""
    every: bool = False
    """Return every position's logits (verifying proposed tokens)."""
    logits: np.ndarray | None = None
    index: int = -1


@dataclass(eq=False)
class _Call(_Work):
    """A call that needs the context alone (state copies, clearing a sequence)."""

    fn: Callable[[], Any] = lambda: None
    result: Any = None


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
    """Threads per evaluation; 0 takes every idle core, decided before each step."""
    offload_kv: bool
    """Keep the KV cache on the GPU (with offloaded layers)."""
    flash_attn: int = 0
    """``llama_flash_attn_type``: -1 auto, 0 off, 1 on."""


class SharedContext:
    """A llama context whose sequences are the slots, driven by one decode thread."""

    def __init__(
        self,
        lib: ModuleType,
        model: int,
        n_vocab: int,
        params: SharedContextParams,
        log: LibraryLog | None = None,
    ) -> None:
        self.lib = lib
        self._log = log
        self.n_vocab = n_vocab
        self.params = params
        cp = lib.llama_context_default_params()
        cp.n_ctx = params.n_ctx_seq * params.n_seq
        # Room for one prefill chunk plus a decode token of every other sequence.
        self.capacity = params.n_batch + params.n_seq
        cp.n_batch = self.capacity
        cp.n_ubatch = self.n_ubatch = min(self.capacity, UBATCH)
        cp.n_seq_max = params.n_seq
        # One step evaluates every running sequence at once, so it is never split among
        # slots (busy stays 1): a lone turn and two turns in one batch get the same cores.
        self.share = ThreadShare(params.threads)
        self.threads = cp.n_threads = cp.n_threads_batch = self.share.threads()
        """Threads of the latest step (for the start log and benchmarks)."""
        cp.offload_kqv = params.offload_kv
        cp.flash_attn_type = params.flash_attn
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
        self._queue: list[_Eval | _Call] = []
        self._closing = False
        self._expected: set[int] = set()
        self._last_decode_s = 0.0
        self.steps = 0
        """llama_decode calls made (for benchmarks)."""
        self.evaluations = 0
        """Requests evaluated; ``evaluations / steps`` shows how much was batched."""
        self._thread = threading.Thread(target=self._drive, name="llama-decode", daemon=True)
        self._thread.start()

    # -- what slots call ----------------------------------------------------------------------
    def evaluate(
        self, seq: int, tokens: Sequence[int], pos: int, trim: bool, every: bool = False
    ) -> np.ndarray:
        """Evaluate ``tokens`` of ``seq`` at ``pos``…; the logits after the last one (with
        ``every``, after each one: ``len(tokens)`` rows)."""
        work = self._wait(_Eval(seq=seq, tokens=tokens, pos=pos, trim=trim, every=every))
        assert work.logits is not None
        return work.logits

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the decode thread, between steps; its result."""
        return self._wait(_Call(fn=fn)).result

    def filled(self, seq: int) -> int:
        """Positions ``seq`` holds (call on the decode thread)."""
        return int(self.lib.llama_memory_seq_pos_max(self.memory, seq)) + 1

    def _wait(self, work: _Eval | _Call) -> Any:
        with self._cond:
            if self._closing:
                raise RuntimeError("the llama.cpp context is closed")
            self._queue.append(work)
            self._cond.notify()
        work.finished.wait()
        if work.error is not None:
            raise work.error
        return work

    # -- the decode thread ----------------------------------------------------------------------
    def _drive(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                work = self._take()
            try:
                if isinstance(work, _Call):
                    work.result = work.fn()
                else:
                    self._run(work)
            except BaseException as e:  # handed to every waiting slot
                for w in work if isinstance(work, list) else [work]:
                    w.error = e
            for w in work if isinstance(work, list) else [work]:
                w.finished.set()

    def _take(self) -> _Call | list[_Eval]:
        """The next call, or evaluations for one step (caller holds the lock)."""
        head = self._queue[0]
        if isinstance(head, _Call):
            del self._queue[0]
            return head
        deadline = time.monotonic() + min(_GRACE_CAP_S, self._last_decode_s / 2)
        while self._expected - {w.seq for w in self._queue if isinstance(w, _Eval)}:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        batch: list[_Eval] = []
        used = 0
        while self._queue and isinstance(self._queue[0], _Eval):
            w = self._queue[0]
            if batch and used + len(w.tokens) > self.capacity:
                break
            batch.append(w)
            used += len(w.tokens)
            self._queue.pop(0)
        # Every sequence of this step comes back: a decoding one with its next token (or
        # its proposed followers), a prefilling one with its next chunk, which then joins
        # the decoders' step instead of racing them for the next.
        self._expected = {w.seq for w in batch}
        return batch

    def _run(self, batch: list[_Eval]) -> None:
        lib, b = self.lib, self._batch
        n = 0
        # Sequences in increasing id order: with a KV stream per sequence, llama.cpp puts
        # into one micro-batch only a run of consecutive ids (0, 1, 2…); any other order
        # evaluates each sequence's token in a graph of its own, at almost the cost of all.
        batch = sorted(batch, key=lambda w: w.seq)
        for w in batch:
            if w.trim:
                lib.llama_memory_seq_rm(self.memory, w.seq, w.pos, -1)
            last = len(w.tokens) - 1
            for j, tok in enumerate(w.tokens):
                b.token[n] = tok
                b.pos[n] = w.pos + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = w.seq
                b.logits[n] = w.every or j == last
                n += 1
            w.index = n - len(w.tokens) if w.every else n - 1
        b.n_tokens = n
        # Set every step: the idle cores change as other processes come and go.
        self.threads = self.share.threads()
        lib.llama_set_n_threads(self.handle, self.threads, self.threads)
        start = time.perf_counter()
        with self._log.capture() if self._log else contextlib.nullcontext([]) as logged:
            rc = lib.llama_decode(self.handle, b)
        self._last_decode_s = time.perf_counter() - start
        self.steps += 1
        self.evaluations += len(batch)
        if rc != 0:
            raise LlamaCppDecodeError(rc, n, self._refusal(batch, logged))
        for w in batch:
            if not w.every:
                w.logits = self._row(w.index)
                continue
            w.logits = np.stack([self._row(w.index + j) for j in range(len(w.tokens))])

    def _row(self, index: int) -> np.ndarray:
        """A copy of the logits of batch position ``index``."""
        ptr = self.lib.llama_get_logits_ith(self.handle, index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _refusal(self, batch: list[_Eval], logged: list[str]) -> str:
        """The library's reason, and where each sequence of the refused batch stood."""
        where = ", ".join(
            f"sequence {w.seq} positions {w.pos}..{w.pos + len(w.tokens) - 1} "
            f"(it held {self.filled(w.seq)})"
            for w in batch
        )
        reason = summary(logged)
        return f"{where}; llama.cpp: {reason}" if reason else where

    def close(self) -> None:
        """Finish queued work, stop the decode thread, free the batch and the context."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
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
        self._state_buf: ctypes.Array[ctypes.c_uint8] | None = None
        self._shifted = False

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
                self._filled = self.shared.call(lambda: self.shared.filled(self.seq_id))
                raise
            trim = False
            self._filled = n_past + start + len(chunk)
        if self._shifted:
            self._compact()

    def eval_all(self, tokens: Sequence[int], n_past: int) -> np.ndarray:
        """Evaluate ``tokens`` at ``n_past``… in one batch (at most ``n_batch`` of them);
        the logits after each (``len(tokens)`` × n_vocab). Later positions are discarded."""
        if not tokens or len(tokens) > self.shared.params.n_batch:
            raise ValueError(f"eval_all takes 1 to {self.shared.params.n_batch} tokens")
        trim = n_past < self._filled
        try:
            rows = self.shared.evaluate(self.seq_id, tokens, n_past, trim, every=True)
        except BaseException:
            self._filled = self.shared.call(lambda: self.shared.filled(self.seq_id))
            raise
        self._filled = n_past + len(tokens)
        self._logits = rows[-1]
        if self._shifted:
            self._compact()
        return rows

    def discard(self, n_past: int) -> None:
        """Drop this sequence's cells from position ``n_past`` on (proposed tokens that were
        not taken); the logits of a dropped position are gone with it."""
        if n_past >= self._filled:
            return
        ctx, seq = self.shared, self.seq_id
        ctx.call(lambda: ctx.lib.llama_memory_seq_rm(ctx.memory, seq, n_past, -1))
        self._filled = n_past
        self._logits = None

    def _compact(self) -> None:
        """Lay this sequence's cells out as a restore of their bytes does.

        A shift leaves the kept cells where they were and the next tokens in the freed
        ones, out of order; llama.cpp sums attention in cell order (probabilities rounded
        to f16), so the next batch would differ by ~2% of a logit from the same state
        restored from the bank. Rewriting the cells from their own bytes makes the warm
        slot and any restore of its snapshot compute alike. Done after the first
        evaluation that follows the shift: that one applies the RoPE shift to the keys,
        which llama.cpp's state copy does not.
        """
        self._shifted = False
        logits = self._logits
        self.set_state(self.state_bytes())
        self._logits = logits

    def shift(self, start: int, end: int) -> bool:
        """Drop cells ``start``…``end`` and move the later ones down by ``end - start``.

        The kept cells' K vectors are re-rotated by llama.cpp (RoPE shift) instead of being
        evaluated again; False when this model's memory cannot shift.
        """
        lib, ctx, seq = self.shared.lib, self.shared, self.seq_id

        def move() -> bool:
            if not lib.llama_memory_can_shift(ctx.memory):
                return False
            lib.llama_memory_seq_rm(ctx.memory, seq, start, end)
            lib.llama_memory_seq_add(ctx.memory, seq, end, -1, start - end)
            return True

        moved = bool(ctx.call(move))
        if moved:
            self._filled -= end - start
            self._logits = None
            self._shifted = True
        return moved

    def logits(self) -> np.ndarray:
        """Logits after the last evaluated token."""
        if self._logits is None:
            raise RuntimeError("no token evaluated on this sequence since it was restored")
        return self._logits

    def state_bytes(self) -> bytes:
        """This sequence's KV cells as bytes."""
        data: bytes = self.shared.call(self._copy_state)
        return data

    def _copy_state(self) -> bytes:
        lib, ctx = self.shared.lib, self.shared
        size = int(lib.llama_state_seq_get_size(ctx.handle, self.seq_id))
        # A fresh buffer per copy costs page faults on every snapshot; keep the largest.
        if self._state_buf is None or len(self._state_buf) < size:
            self._state_buf = (ctypes.c_uint8 * size)()
        used = int(lib.llama_state_seq_get_data(ctx.handle, self._state_buf, size, self.seq_id))
        if used == 0:
            raise RuntimeError(f"llama.cpp copied no state of sequence {self.seq_id}")
        return ctypes.string_at(self._state_buf, used)

    def set_state(self, data: bytes) -> None:
        """Replace this sequence's cells with a state made by ``state_bytes``."""
        lib, ctx = self.shared.lib, self.shared
        # llama_state_seq_set_data only reads its input: point it at the bytes, no copy.
        buf = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))

        def restore() -> tuple[int, int]:
            lib.llama_memory_seq_rm(ctx.memory, self.seq_id, -1, -1)
            read = int(lib.llama_state_seq_set_data(ctx.handle, buf, len(data), self.seq_id))
            return read, ctx.filled(self.seq_id)

        read, self._filled = ctx.call(restore)
        self._logits = None
        if read != len(data):
            raise RuntimeError(f"state restore read {read} of {len(data)} bytes")

    def close(self) -> None:
        """Drop this sequence's cells (the shared context is freed by the backend)."""
        ctx = self.shared
        if ctx.handle:
            ctx.call(lambda: ctx.lib.llama_memory_seq_rm(ctx.memory, self.seq_id, -1, -1))
        self._filled = 0
