"""Prompt tokenisation that understands special tokens and splices stored token ids.

The bundled llama.cpp tokenises text only: ``<|im_end|>`` in a prompt would become a run
of punctuation pieces, and its SentencePiece path prefixes every call with a space. This
module splits a rendered prompt on the vocabulary's control-token texts (mapping each to
its id), tokenises the text between them without a spurious leading space, and splices the
exact token ids a previous turn generated where the prompt repeats that turn. The last
point is what makes a session's next prompt extend its committed tokens exactly, so the
whole history is reused from the cache, and a cold recompute sees the same tokens.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping, Sequence


def assistant_mark(index: int) -> str:
    """A placeholder rendered in place of an assistant turn whose token ids are known.

    It carries a random nonce, so text a user writes can never be taken for one.
    """
    return f"\ue000{secrets.token_hex(8)}:{index}\ue001"

_CONTINUATION = "\n"
"""Prepended to a later text segment so the tokenizer's leading space lands on it."""


class PromptTokenizer:
    """Turns rendered prompt text into token ids."""

    def __init__(
        self,
        tokenize: Callable[[str, bool], list[int]],
        specials: Mapping[str, int],
        bos_id: int,
        adds_space_prefix: bool,
        adds_bos: bool,
    ) -> None:
        self._tokenize = tokenize
        self._specials = dict(specials)
        self._bos_id = bos_id
        self._space_prefix = adds_space_prefix
        self.adds_bos = adds_bos
        """Whether the vocabulary wants a BOS token at all."""
        names = sorted((re.escape(s) for s in self._specials if s), key=len, reverse=True)
        self._special_re = re.compile("|".join(names)) if names else None
        self._cont_prefix = tokenize(_CONTINUATION, False) if adds_space_prefix else []

    def encode(
        self,
        text: str,
        add_bos: bool,
        spliced: Mapping[str, Sequence[int]] | None = None,
    ) -> list[int]:
        """Token ids of ``text``; each ``assistant_mark`` key of ``spliced`` becomes its ids.

        BOS leads only when asked for (the template lacks it) and the model uses one.
        """
        out: list[int] = [self._bos_id] if add_bos and self.adds_bos else []
        at_start = True
        pos = 0
        marks = (
            re.compile("|".join(re.escape(m) for m in spliced)) if spliced else None
        )
        for mark in marks.finditer(text) if marks is not None else ():
            at_start = self._encode_text(text[pos : mark.start()], out, at_start)
            ids = spliced[mark.group(0)]  # type: ignore[index]
            out.extend(ids)
            at_start = at_start and not ids
            pos = mark.end()
        self._encode_text(text[pos:], out, at_start)
        return out

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the control and user-defined tokens recognised by their text."""
        return frozenset(self._specials.values())

    def special_id(self, text: str) -> int | None:
        """The id of the special token spelled ``text``, if the vocabulary has one."""
        return self._specials.get(text)

    def continuation(self, text: str) -> list[int]:
        """Ids of ``text`` as it follows other text (no leading space added, no specials)."""
        return self._plain(text, False) if text else []

    def _encode_text(self, text: str, out: list[int], at_start: bool) -> bool:
        pos = 0
        if self._special_re is not None:
            for special in self._special_re.finditer(text):
                if special.start() > pos:
                    out.extend(self._plain(text[pos : special.start()], at_start))
                    at_start = False
                out.append(self._specials[special.group(0)])
                at_start = False
                pos = special.end()
        if pos < len(text):
            out.extend(self._plain(text[pos:], at_start))
            at_start = False
        return at_start

    def _plain(self, text: str, at_start: bool) -> list[int]:
        if at_start or not self._space_prefix:
            return self._tokenize(text, False)
        ids = self._tokenize(_CONTINUATION + text, False)
        n = len(self._cont_prefix)
        if ids[:n] == self._cont_prefix:
            return ids[n:]
        # The marker merged with the text; a leading space is the lesser evil.
        return self._tokenize(text, False)
