"""What every engine offers the node, whichever library runs the model.

Session and bank code see only these types. A backend (ctransformers' llama.cpp, or a
current llama.cpp) provides contexts that evaluate tokens, expose logits and move KV state
as bytes; ``SlotEngine`` builds slots, prefix reuse, sampling and banking on top of it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from actors.engine.tokenizer import PromptTokenizer
from schemas.chat import (
    CacheInfo,
    ChatMessage,
    Timings,
    ToolCall,
    Usage,
)
from schemas.records import ReplyParams
from schemas.tools import Tool


class BackendContext(Protocol):
    """One KV cache over the shared weights."""

    n_ctx: int

    def eval(self, tokens: Sequence[int], n_past: int) -> None:
        """Evaluate ``tokens`` at positions ``n_past``…; later positions are discarded."""

    def logits(self) -> np.ndarray:
        """Logits after the last evaluated token."""

    def state_bytes(self) -> bytes:
        """The KV state as bytes."""

    def set_state(self, data: bytes) -> None:
        """Restore a state made by ``state_bytes``."""

    def close(self) -> None:
        """Free the context."""


class Backend(Protocol):
    """A loaded model: shared weights, a tokenizer, contexts on demand."""

    name: str
    model_id: str
    description: str
    n_vocab: int
    n_ctx: int
    bos_id: int
    eos_id: int
    bos_text: str
    eos_text: str
    tokenizer: PromptTokenizer
    # A backend may also have ``eog_ids: frozenset[int]``, every token that ends a reply;
    # read it through ``end_of_generation``.

    def piece(self, token: int) -> bytes:
        """Bytes of one token."""

    def new_context(self) -> BackendContext:
        """A fresh context (one slot)."""

    def close(self) -> None:
        """Free the weights."""


def end_of_generation(backend: Backend) -> frozenset[int]:
    """Tokens that end a reply: the backend's ``eog_ids`` (EOS, EOT, ``<|im_end|>``…) if it
    names them, else its EOS alone."""
    eog: frozenset[int] | None = getattr(backend, "eog_ids", None)
    return eog if eog else frozenset({backend.eos_id})


class CancelToken:
    """Crosses from the event loop to a worker thread; checked before every prefill chunk
    and every token."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "client") -> None:
        """Ask the running turn to stop."""
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """True once cancel() was called."""
        return self._event.is_set()


@dataclass(frozen=True)
class PrefillProgress:
    """How far a long prefill got: reported every few seconds while it runs."""

    done: int
    """Prompt tokens the slot holds now (``cached`` included)."""
    total: int
    """Prompt tokens of the turn."""
    cached: int
    """Of those, tokens reused without evaluation."""
    elapsed_ms: float
    """Since the prefill began."""


@dataclass(frozen=True)
class TurnSpec:
    """One turn to run."""

    session: str
    turn_id: str
    messages: tuple[ChatMessage, ...]
    params: ReplyParams
    """How the reply is generated: sampling, stops, length, window policy, tool use."""
    assistant_tokens: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    """Exact token ids generated for assistant messages, by message index."""
    generation: int = 0
    """The session's committed generation (0: it never had a turn)."""
    queue_ms: float = 0.0
    tools: tuple[Tool, ...] = ()
    """The session's tools, rendered into the prompt."""
    window_start: int | None = None
    """Where the session's record log says its window starts (an index in the conversation:
    ``messages`` with the ``omitted`` ones); None: the engine's own memory decides."""
    omitted: int = 0
    """History messages right after the leading system messages that ``messages`` leaves
    out, all before the recorded window."""
    omitted_turns: int = 0
    """Whole turns among them."""


@dataclass(frozen=True)
class TurnOutcome:
    """What a turn produced."""

    raw_text: str
    text: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: str
    completion_ids: tuple[int, ...] | None
    usage: Usage
    cache: CacheInfo
    timings: Timings
    n_tokens: int
    token_hash: str
    window_start: int = 0
    """Index in the turn's conversation (``omitted`` messages counted) of the first message
    after the system head still seen."""
    stop_sequence: str | None = None
    """The prompt's stop string that ended the reply, if one did."""


@dataclass(frozen=True)
class SnapshotOutcome:
    """Result of banking a session's slot."""

    stored: bool
    n_tokens: int = 0
    nbytes: int = 0
    ms: float = 0.0
    reason: str | None = None


@dataclass(frozen=True)
class EngineInfo:
    """What the node reports about its engine."""

    engine: str
    model: str
    model_id: str
    n_ctx: int
    n_vocab: int
    n_slots: int
    snapshots: bool
    snapshot_note: str
    template: str
