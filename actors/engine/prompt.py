"""A turn's prompt: the conversation rendered by the chat template and tokenised, under the
session's window policy.

Content an agent wrote is shielded before rendering, so it is tokenised as plain text and only
the template's own markup makes control tokens; assistant turns the node generated are spliced
back as the exact token ids it sampled, so the next turn's prefix matches the cached state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from actors.engine.interface import Backend, TurnSpec
from actors.engine.templates.chat import ChatTemplate
from actors.engine.tokenizer import assistant_mark, shield_nonce, shielded
from actors.engine.window import Window, recorded, slide, system_head, view
from schemas.chat import ChatMessage, OverflowPolicy
from schemas.errors import ErrorCode, InferError
from schemas.tools import Tool


class PromptBuilder:
    """Renders and tokenises turns; keeps each session's window (what the model still sees)."""

    def __init__(self, backend: Backend, template: ChatTemplate, overflow: OverflowPolicy) -> None:
        self.backend = backend
        self.template = template
        self.overflow: OverflowPolicy = overflow
        """The node's window policy; a prompt may name another."""
        self._windows: dict[str, Window] = {}

    def policy(self, spec: TurnSpec) -> OverflowPolicy:
        """The window policy of this turn: the prompt's own, else the node's."""
        return spec.params.overflow or self.overflow

    def forget(self, session: str) -> None:
        """Drop the window of a deleted session."""
        self._windows.pop(session, None)

    def window_tokens(self, spec: TurnSpec) -> tuple[list[int], Window]:
        """The prompt's tokens under the turn's window policy, and the window they show."""
        n_ctx = self.backend.n_ctx
        policy = self.policy(spec)
        if policy == "refuse":  # a window the log moved stays: what it left out is not sent
            tokens, window = self.prompt_tokens(spec), logged(spec) if spec.omitted else Window()
        else:
            cache: dict[int, list[int]] = {}

            def measure(start: int) -> int:
                msgs, ids = view(spec.messages, spec.assistant_tokens, start)
                cache[start] = self.encode(msgs, ids, spec.tools)
                return len(cache[start])

            budget = max(1, n_ctx - spec.params.max_tokens)
            current = self._windows.get(spec.session, Window())
            if spec.window_start is not None and spec.window_start != current.start:
                # The log's window, not this node's memory of it: a session that moved
                # here (or back) shows the model what the last node did.
                current = logged(spec)
            # Indices in ``spec.messages`` are the conversation's less the omitted ones.
            here = replace(current, start=current.start - spec.omitted)
            window, _ = slide(spec.messages, here, measure, budget)
            tokens = cache[max(window.start, system_head(spec.messages))]
            window = replace(window, start=window.start + spec.omitted)
            self._windows[spec.session] = window
        if len(tokens) >= n_ctx:
            fix = "" if policy == "refuse" else "its newest turn alone does not fit; "
            raise InferError(
                ErrorCode.CONTEXT_OVERFLOW,
                f"the prompt is {len(tokens)} tokens but the context holds {n_ctx}; {fix}"
                "shorten the history, start the node with a larger --ctx"
                + (", or send overflow: truncate" if policy == "refuse" else ""),
                {"prompt_tokens": len(tokens), "n_ctx": n_ctx},
            )
        return tokens, window

    def prompt_tokens(self, spec: TurnSpec) -> list[int]:
        """Render the whole conversation and tokenise it, splicing known assistant token ids."""
        return self.encode(spec.messages, spec.assistant_tokens, spec.tools)

    def encode(
        self,
        conversation: Sequence[ChatMessage],
        assistant_tokens: Mapping[int, tuple[int, ...]],
        tools: Sequence[Tool] = (),
    ) -> list[int]:
        """Render ``conversation`` (with ``tools``) and tokenise it, splicing known assistant
        token ids."""
        messages: list[ChatMessage] = []
        spliced: dict[str, tuple[int, ...]] = {}
        tokenizer, nonce = self.backend.tokenizer, shield_nonce()
        for i, m in enumerate(conversation):
            ids = assistant_tokens.get(i)
            if m.role == "assistant" and ids is not None:
                mark = assistant_mark(i)
                messages.append(ChatMessage(role="assistant", content=mark))
                spliced[mark] = ids
            else:  # what an agent wrote is text: it never becomes a control token
                messages.append(shielded(m, tokenizer, nonce))
        listed = [t.model_dump(exclude_none=True) for t in tools]
        try:
            text = self.template.render(messages, add_generation_prompt=True, tools=listed)
        except ValueError as e:
            raise InferError(ErrorCode.BAD_REQUEST, f"the chat template failed: {e}") from e
        bos = self.backend.bos_text
        add_bos = not (bos and text.startswith(bos))
        return tokenizer.encode(text, add_bos, spliced, nonce)


def logged(spec: TurnSpec) -> Window:
    """The window the session's record log names, in the conversation's indices: what the
    request left out (``spec.omitted``) is all before it, and counts as dropped."""
    start = spec.window_start or 0
    here = recorded(spec.messages, start - spec.omitted)
    return replace(
        here, start=start, dropped_turns=here.dropped_turns + spec.omitted_turns,
        dropped_messages=here.dropped_messages + spec.omitted,
    )
