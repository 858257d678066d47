"""Which chat template a model gets: its own, a built-in by name, a jinja file, or a fallback.

The model's template and a file are untrusted input: each renders a probe conversation in
the sandbox before it is used. Every built-in names its end-of-turn marker; when the model
does not write that marker as one of its end-of-generation tokens, the marker is also a stop
string (``turn_stops``), so every turn ends even on a model trained on other markup.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from pathlib import Path

import structlog

from actors.engine.templates.chat import (
    _PROBE_HISTORY,
    FALLBACK_SOURCES,
    TEMPLATE_CHOICES,
    ChatTemplate,
    TemplateError,
)
from actors.engine.templates.families import FAMILIES

log = structlog.get_logger("engine")

END_MARKERS: dict[str, str] = {
    "chatml": "<|im_end|>", **{name: f.end for name, f in FAMILIES.items()},
}
"""Each built-in's end-of-turn marker; llama-2 and mistral end a turn with the EOS token."""
_FAMILY_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"), **{n: f.tokens for n, f in FAMILIES.items()},
}
"""Special tokens that show a vocabulary was trained on a built-in's markup."""


def select_template(
    name: str, gguf_template: str | None, bos: str, eos: str,
    specials: Collection[str] = (),
) -> ChatTemplate:
    """The template called ``name``: one of ``TEMPLATE_CHOICES`` or a jinja file's path.

    The model's own template and a file are untrusted: before either is used it must render
    a probe conversation inside the sandbox. ``gguf`` refuses a template that fails (the node
    does not start, and says why); ``auto`` falls back to the built-in whose markup the
    vocabulary (``specials``, its special-token texts) knows, else chatml, with a warning.
    """
    if name in FALLBACK_SOURCES:
        return _builtin(name, bos, eos)
    if name == "gguf":
        if not gguf_template:
            raise TemplateError("the model file has no tokenizer.chat_template; choose one of "
                                f"{', '.join(c for c in TEMPLATE_CHOICES if c != 'gguf')}")
        try:
            return _probed(gguf_template, bos, eos)
        except TemplateError as e:
            raise TemplateError(f"the model's chat template is refused: {e}; choose one of "
                                f"{', '.join(FALLBACK_SOURCES)} with --chat-template") from e
    if name != "auto":
        return _from_file(name, bos, eos)
    reason = "the model file has no tokenizer.chat_template"
    if gguf_template:
        try:
            return _probed(gguf_template, bos, eos)
        except TemplateError as e:
            reason = f"the model's template fails on a probe conversation: {e}"
    fallback = _builtin(_family_of(specials), bos, eos)
    fallback.note = reason
    log.warning(
        "chat_template_fallback", template=fallback.name, reason=reason,
        end_marker=fallback.end_marker,
        fix="pass --chat-template NAME or FILE.jinja if the model was trained on another",
    )
    return fallback


def _builtin(name: str, bos: str, eos: str) -> ChatTemplate:
    template = ChatTemplate(FALLBACK_SOURCES[name], bos, eos, name=name)
    template.end_marker = END_MARKERS.get(name, eos or None)
    return template


def _family_of(specials: Collection[str]) -> str:
    """The built-in whose markup tokens are all in the vocabulary; chatml if none is."""
    for name, tokens in _FAMILY_TOKENS.items():
        if tokens and all(t in specials for t in tokens):
            return name
    return "chatml"


def _from_file(name: str, bos: str, eos: str) -> ChatTemplate:
    """A template read from the jinja file ``name``, probed like the model's own."""
    path = Path(name).expanduser()
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError(
            f"chat template {name!r} is neither a built-in ({', '.join(TEMPLATE_CHOICES)}) "
            f"nor a readable jinja file ({e})"
        ) from e
    # The name is what the bank compares: an edited file must not restore old snapshots.
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    try:
        template = ChatTemplate(source, bos, eos, name=f"file:{path.name}:{digest}")
        template.render(_PROBE_HISTORY[1:])
    except TemplateError as e:
        raise TemplateError(f"the chat template file {path} is refused: {e}") from e
    return template


def turn_stops(template: ChatTemplate, specials: Mapping[str, int], eog: Collection[int]
               ) -> tuple[str, ...]:
    """Stop strings every turn needs so it ends: the template's end marker, unless the
    model writes it as one of its end-of-generation tokens (which end a turn anyway)."""
    marker = template.end_marker
    if not marker or specials.get(marker) in eog:
        return ()
    return (marker,)


def _probed(source: str, bos: str, eos: str) -> ChatTemplate:
    """The model's template, once it rendered a probe conversation."""
    template = ChatTemplate(source, bos, eos, name="gguf")
    template.render(_PROBE_HISTORY[1:])
    return template
