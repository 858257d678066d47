"""Constrained decoding with llguidance: a tokenizer built from the model's own token bytes,
and a matcher per turn whose token mask our sampler applies.

One implementation serves both engines: the mask is applied to the logits in
``Sampler.sample`` (``actors/engine/sampling.py``), so neither library's grammar sampler is
used (ctransformers' bundled llama.cpp has none that parses GBNF from Python).
"""

from __future__ import annotations

import threading

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from actors.engine.constraints import CLOSE, OPEN, grammar_for
from actors.engine.interface import Backend, TurnSpec, end_of_generation
from schemas.errors import ErrorCode, InferError

_SPECIAL = b"\xff"
"""llguidance's mark of a special token: text never matches it, a grammar names it by id."""


class _Vocabulary:
    """What ``llguidance.TokenizerWrapper`` reads from a tokenizer."""

    def __init__(self, backend: Backend) -> None:
        tokenizer = backend.tokenizer
        special = tokenizer.special_ids | end_of_generation(backend) | {backend.bos_id}
        self.eos_token_id = backend.eos_id
        self.bos_token_id = backend.bos_id
        self.tokens = [
            _SPECIAL + backend.piece(i) if i in special else backend.piece(i)
            for i in range(backend.n_vocab)
        ]
        self.special_token_ids: list[int] = []
        self._continuation = tokenizer.continuation

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        # llguidance tokenizes text that follows other text: no leading space may be added.
        return self._continuation(text)


class Grammars:
    """Builds the llguidance tokenizer once (lazily: ~0.5 s for a 50k vocabulary) and a
    ``Constraint`` per constrained turn."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None

    def tokenizer(self) -> llguidance.LLTokenizer:
        """The llguidance tokenizer of the model."""
        with self._lock:
            if self._tokenizer is None:
                wrapper = llguidance.TokenizerWrapper(_Vocabulary(self.backend))
                eog = sorted(end_of_generation(self.backend))
                self._tokenizer = llguidance.LLTokenizer(
                    wrapper, n_vocab=self.backend.n_vocab, eos_token=eog
                )
            return self._tokenizer

    def constraint(self, spec: TurnSpec) -> Constraint | None:
        """The constraint of ``spec``'s reply, or None when it is free text."""
        specials = self.backend.tokenizer
        grammar = grammar_for(
            spec.tools, spec.params.tool_choice, spec.params.response_format,
            specials.special_id(OPEN), specials.special_id(CLOSE),
        )
        if grammar is None:
            return None
        return Constraint(self.tokenizer(), grammar, self.backend.n_vocab)


class Constraint:
    """One turn's grammar state: which tokens may come next, and whether it is complete."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, n_vocab: int) -> None:
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise InferError(
                ErrorCode.BAD_REQUEST,
                f"the reply's grammar cannot be built: {self.matcher.get_error()}",
            )
        self.n_vocab = n_vocab
        self._bits = llg_numpy.allocate_token_bitmask(1, tokenizer.vocab_size)

    def allowed(self) -> np.ndarray:
        """A boolean mask over the vocabulary of the tokens the grammar allows next."""
        llg_numpy.fill_next_token_bitmask(self.matcher, self._bits, 0)
        bits = np.unpackbits(self._bits[0].view(np.uint8), bitorder="little")
        return bits[: self.n_vocab].view(np.bool_)

    def consume(self, token: int) -> None:
        """Advance past ``token`` (one the mask allowed)."""
        if not self.matcher.consume_token(token):
            raise InferError(
                ErrorCode.INTERNAL,
                f"the grammar refused token {token} it had allowed: {self.matcher.get_error()}",
            )

    @property
    def complete(self) -> bool:
        """True once the grammar allows nothing more (the reply is whole)."""
        return self.matcher.is_stopped()
