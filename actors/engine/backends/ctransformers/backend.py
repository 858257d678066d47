"""The default backend: the llama.cpp C API inside ctransformers 0.2.27's library."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from actors.engine.backends.ctransformers import api as llama_api
from actors.engine.backends.ctransformers.model import LlamaContext, LlamaModel
from actors.engine.backends.params import ModelParams
from actors.engine.gguf_info import model_id_of
from actors.engine.tokenizer import PromptTokenizer

_CONTROL, _USER_DEFINED = 3, 4


class CtransformersBackend:
    """Shared weights and a tokenizer; contexts on demand."""

    name = "ctransformers"

    def __init__(
        self, params: ModelParams, lib_path: Path, cuda: bool, verbose: bool = False
    ) -> None:
        self.lib_path = lib_path
        lib = llama_api.load_library(lib_path, cuda=cuda, verbose=verbose)
        self.model = LlamaModel(lib, params)
        self._path = params.path
        self.description = self.model.description
        self.n_vocab = self.model.n_vocab
        self.n_ctx = params.n_ctx
        probe = self.model.new_context()
        try:
            self.bos_id, self.eos_id = probe.bos, probe.eos
            specials = self._special_tokens(probe)
        finally:
            probe.close()
        self.bos_text = self._text(self.bos_id)
        self.eos_text = self._text(self.eos_id)
        # The library spells control tokens as nothing; markup such as <|im_end|> or
        # <tool_call> must reach the stop matcher and the tool-call parser as text.
        self._special_pieces = {
            tok: text.encode("utf-8")
            for text, tok in specials.items()
            if tok not in (self.bos_id, self.eos_id)
        }
        spm = self._text_of_space_prefix()
        self.tokenizer = PromptTokenizer(
            lambda text, bos: self.model.tokenize(text, bos), specials, self.bos_id, spm,
            adds_bos=True,
        )

    @functools.cached_property
    def model_id(self) -> str:
        """Identity of the weights: a hash of the whole file, computed when first asked."""
        return model_id_of(self._path)

    def _special_tokens(self, ctx: LlamaContext) -> dict[str, int]:
        lib = self.model.lib
        found: dict[str, int] = {}
        for tok in range(self.n_vocab):
            if lib.llama_token_get_type(ctx.handle, tok) in (_CONTROL, _USER_DEFINED):
                raw = lib.llama_token_get_text(ctx.handle, tok)
                text = raw.decode("utf-8", errors="replace") if raw else ""
                if text:
                    found[text] = tok
        self._texts = found
        return found

    def _text(self, token: int) -> str:
        for text, tok in self._texts.items():
            if tok == token:
                return text
        return ""

    def _text_of_space_prefix(self) -> bool:
        # SentencePiece vocabularies make the tokenizer prefix every call with a space.
        first = self.model.tokenize("a", False)
        return bool(first) and self.model.piece(first[0]).startswith(b" ")

    def piece(self, token: int) -> bytes:
        """Bytes of one token."""
        special = self._special_pieces.get(token)
        return special if special is not None else self.model.piece(token)

    def share_cores(self, busy: Callable[[], int]) -> None:
        """Split the cores among the ``busy()`` slots running a turn (unless fixed)."""
        self.model.threads.busy = busy

    def new_context(self) -> LlamaContext:
        """A fresh context over the shared weights."""
        return self.model.new_context()

    def close(self) -> None:
        """Free the weights."""
        self.model.close()
