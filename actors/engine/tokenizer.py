"""Prompt tokenisation that understands special tokens and splices stored token ids.

The bundled llama.cpp tokenises text only: ``<|im_end|>`` in a prompt would become a run
of punctuation pieces, and its SentencePiece path prefixes every call with a space. This
module splits a rendered prompt on the vocabulary's control-token texts (mapping each to
its id), tokenises the text between them without a spurious leading space, and splices the
exact token ids a previous turn generated where the prompt repeats that turn. The last
point is what makes a session's next prompt extend its committed tokens exactly, so the
whole history is reused from the cache, and a cold recompute sees the same tokens.

Only the template's own markup may become control tokens. Text an agent sent (message
content, a tool result, call arguments) is ``shield``-ed before rendering: every control-token
text in it becomes a placeholder carrying the prompt's random nonce, and ``encode`` turns
the placeholders back into that text tokenised as plain text. So ``<|im_end|>`` written in a
user message cannot close the turn, nor ``<|im_start|>system`` open a system turn.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping, Sequence

from schemas.chat import ChatMessage


def assistant_mark(index: int) -> str:
    """A placeholder rendered in place of an assistant turn whose token ids are known.

    It carries a random nonce, so text a user writes can never be taken for one.
    """
    return f"\ue000{secrets.token_hex(8)}:{index}\ue001"

def shield_nonce() -> str:
    """A fresh nonce for one prompt's shield placeholders (digits: case changes keep it)."""
    return str(secrets.randbelow(10**16)).zfill(16)


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
        self._special_texts = sorted(self._specials)
        self._special_index = {text: i for i, text in enumerate(self._special_texts)}
        self._cont_prefix = tokenize(_CONTINUATION, False) if adds_space_prefix else []

    @property
    def specials(self) -> Mapping[str, int]:
        """Every control (and user-defined) token's text and id."""
        return self._specials

    def plain_ids(self, text: str) -> list[int]:
        """``text`` tokenised as plain text: no control token is parsed out of it."""
        return self._tokenize(text, False)

    def shield(self, text: str, nonce: str) -> str:
        """``text`` with each control-token text in it replaced by a ``nonce`` placeholder."""
        if self._special_re is None:
            return text
        return self._special_re.sub(
            lambda m: f"\ue002{nonce}:{self._special_index[m.group(0)]}\ue003", text
        )

    def _unshield(self, text: str, nonce: str | None) -> str:
        if nonce is None or "\ue002" not in text:
            return text
        return re.sub(
            f"\ue002{nonce}:(\\d+)\ue003", lambda m: self._special_texts[int(m.group(1))], text
        )

    def encode(
        self,
        text: str,
        add_bos: bool,
        spliced: Mapping[str, Sequence[int]] | None = None,
        nonce: str | None = None,
    ) -> list[int]:
        """Token ids of ``text``; each ``assistant_mark`` key of ``spliced`` becomes its ids.

        BOS leads only when asked for (the template lacks it) and the model uses one.
        Placeholders of ``shield(..., nonce)`` become their text, tokenised as plain text.
        """
        out: list[int] = [self._bos_id] if add_bos and self.adds_bos else []
        at_start = True
        pos = 0
        marks = (
            re.compile("|".join(re.escape(m) for m in spliced)) if spliced else None
        )
        for mark in marks.finditer(text) if marks is not None else ():
            at_start = self._encode_text(text[pos : mark.start()], out, at_start, nonce)
            ids = spliced[mark.group(0)]  # type: ignore[index]
            out.extend(ids)
            at_start = at_start and not ids
            pos = mark.end()
        self._encode_text(text[pos:], out, at_start, nonce)
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

    def _encode_text(self, text: str, out: list[int], at_start: bool, nonce: str | None) -> bool:
        # Split on the markup's control tokens first: shielded text holds none of them.
        pos = 0
        if self._special_re is not None:
            for special in self._special_re.finditer(text):
                if special.start() > pos:
                    piece = self._unshield(text[pos : special.start()], nonce)
                    out.extend(self._plain(piece, at_start))
                    at_start = False
                out.append(self._specials[special.group(0)])
                at_start = False
                pos = special.end()
        if pos < len(text):
            out.extend(self._plain(self._unshield(text[pos:], nonce), at_start))
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


def shielded(message: ChatMessage, tokenizer: PromptTokenizer, nonce: str) -> ChatMessage:
    """``message`` with every text an agent wrote in it shielded (see ``shield``)."""
    update: dict[str, object] = {}
    if message.content:
        update["content"] = tokenizer.shield(message.content, nonce)
    if message.name:
        update["name"] = tokenizer.shield(message.name, nonce)
    if message.tool_calls:
        update["tool_calls"] = tuple(
            call.model_copy(update={"function": call.function.model_copy(update={
                "arguments": tokenizer.shield(call.function.arguments, nonce),
            })})
            for call in message.tool_calls
        )
    return message.model_copy(update=update) if update else message
