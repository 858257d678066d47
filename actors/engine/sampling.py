"""Our own sampling on a logits vector, and the text side of decoding.

``Sampler`` picks the next token from raw logits (the engine owns sampling so every backend
behaves the same and a seed reproduces a reply). ``Utf8Detokenizer`` turns token byte pieces
into text without splitting a character; ``StopMatcher`` withholds text that might be the
start of a stop string.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Sequence

import numpy as np

from schemas.chat import SamplingParams

_FIRST_NUCLEUS = 64
"""Candidates examined first when only top-p bounds the set; grown until it holds the mass."""


class Sampler:
    """Greedy, or penalties → temperature → top-k → top-p → a seeded draw.

    Temperature 0 is a plain argmax of the logits (no penalty): deterministic whatever the
    seed. The repetition penalty follows llama.cpp (positive logits divided, negative
    multiplied), and so do OpenAI's frequency and presence penalties after it (over the same
    last ``repeat_last_n`` tokens); none ever touches ``eos_id``: end-of-turn tokens recur in
    every chat history, and penalising them would keep the model from ever finishing a reply.
    """

    def __init__(self, params: SamplingParams, eos_id: int, n_vocab: int) -> None:
        self.params = params
        self.eos_id = eos_id
        self.n_vocab = n_vocab
        self.seed = params.seed if params.seed is not None else _random_seed()
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        # Reused buffers: fresh vocab-sized arrays every token cost more in page faults
        # than the arithmetic on them.
        self._work = np.empty(n_vocab, dtype=np.float32)
        self._cum = np.empty(n_vocab, dtype=np.float32)
        self._mask_buf = np.empty(n_vocab, dtype=np.float32)

    def sample(
        self, logits: np.ndarray, recent: Sequence[int], allowed: np.ndarray | None = None
    ) -> int:
        """The next token id given ``logits`` (n_vocab) and the tokens just before it.

        ``allowed`` (a boolean mask, from a grammar) removes every other token first, so
        penalties, temperature, top-k and top-p see only what the grammar permits.
        """
        z = np.asarray(logits, dtype=np.float32)[: self.n_vocab]
        if allowed is not None:
            z = self._masked(z, allowed)
        if self.params.temperature == 0.0:
            return int(np.argmax(z))
        z = self._penalised(z, recent)
        top = float(np.max(z))
        if not np.isfinite(top):
            return int(np.argmax(np.nan_to_num(z, nan=-np.inf)))
        pool, weights = self._top_k(z, top)
        ids, cumulative = self._top_p(weights)
        # Searching with a float64 would convert the whole float32 array first.
        u = np.float32(self._rng.random() * float(cumulative[-1]))
        pick = min(int(np.searchsorted(cumulative, u, side="right")), cumulative.size - 1)
        if ids is not None:
            pick = int(ids[pick])
        return int(pool[pick]) if pool is not None else pick

    def _masked(self, z: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        out = self._mask_buf[: z.size]
        out.fill(-np.inf)
        np.copyto(out, z, where=allowed[: z.size])
        return out

    def _penalised(self, z: np.ndarray, recent: Sequence[int]) -> np.ndarray:
        """Repetition, then frequency and presence penalties, in llama.cpp's order."""
        p = self.params
        repeat, freq, presence = p.repeat_penalty, p.frequency_penalty, p.presence_penalty
        if p.repeat_last_n == 0 or not recent or (repeat == 1.0 and freq == presence == 0.0):
            return z
        ids, counts = np.unique(
            np.asarray(recent[-p.repeat_last_n :], dtype=np.int64), return_counts=True
        )
        keep = (ids >= 0) & (ids < z.size) & (ids != self.eos_id)
        ids, counts = ids[keep], counts[keep]
        work = self._work[: z.size]
        np.copyto(work, z)  # the backend's buffer stays untouched
        values = work[ids]
        if repeat != 1.0:
            values = np.where(values > 0, values / repeat, values * repeat)
        if freq != 0.0 or presence != 0.0:
            values = values - np.float32(freq) * counts.astype(np.float32) - np.float32(presence)
        work[ids] = values
        return work

    def _top_k(self, z: np.ndarray, top: float) -> tuple[np.ndarray | None, np.ndarray]:
        """Candidate ids (None: the whole vocabulary) and their unnormalised probabilities."""
        n = z.size
        limit = self.params.top_k if 0 < self.params.top_k < n else n
        if limit < n:
            # argpartition, not a full sort: only the top few of 32k–150k logits matter.
            pool = np.argpartition(z, n - limit)[n - limit :]
            weights = z[pool] - np.float32(top)
        else:
            pool, weights = None, np.subtract(z, np.float32(top), out=self._work[:n])
        weights *= np.float32(1.0 / self.params.temperature)
        return pool, np.exp(weights, out=weights)  # float32: exp in float64 costs ~10x

    def _top_p(self, weights: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Positions in ``weights`` of the nucleus (None: all), and its cumulative weights."""
        n = weights.size
        if self.params.top_p >= 1.0:
            return None, np.cumsum(weights, out=self._cum[:n])
        need = np.float32(self.params.top_p * float(weights.sum(dtype=np.float64)))
        k = min(n, _FIRST_NUCLEUS)
        while True:
            part = np.argpartition(weights, n - k)[n - k :] if k < n else np.arange(n)
            ids = part[np.argsort(-weights[part], kind="stable")]
            cumulative = np.cumsum(weights[ids])
            if cumulative[-1] >= need or k >= n:
                break
            k = min(n, k * 8)
        keep = min(int(np.searchsorted(cumulative, need)) + 1, ids.size)
        return ids[:keep], cumulative[:keep]


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


class Utf8Detokenizer:
    """Joins token byte pieces into text, holding back a character split across pieces.

    Bytes that can never complete a character become U+FFFD at once; an incomplete tail is
    kept until more bytes come or ``flush`` is called.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        """Text completed by ``piece``."""
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """Whatever is held back, with an incomplete tail replaced; the decoder starts over."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    def drop_partial(self) -> bytes:
        """Forget the bytes of an incomplete last character (a reply never ends inside one);
        returns them."""
        held = self.pending
        self._decoder.reset()
        return held

    @property
    def pending(self) -> bytes:
        """Bytes held back."""
        return self._decoder.getstate()[0]


class StopMatcher:
    """Finds stop strings in streamed text without emitting any part of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self.matched: str | None = None
        """The stop string that ended the text, once one did."""
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string appeared); nothing is emitted after one."""
        if self.stopped:
            return "", True
        buffer = self._held + text
        cut = first_stop(buffer, self.stops)
        if cut is not None:
            self.stopped, self._held = True, ""
            self.matched = min((s for s in self.stops if buffer.startswith(s, cut)), key=len)
            return buffer[:cut], True
        keep = self._partial_stop_len(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Held-back text, when the stream ends without completing a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where ``text`` is cut by its first stop string, or None.

    The stream ends as soon as any stop string is complete, so the winner is the occurrence
    that ends first; the cut is at the earliest start among occurrences complete by then.
    This is what feeding one character at a time gives, so token boundaries never matter.
    """
    ends = [i + len(s) for s in stops if s and (i := text.find(s)) >= 0]
    if not ends:
        return None
    window = text[: min(ends)]
    return min(i for s in stops if s and (i := window.find(s)) >= 0)
