"""What the bank knows about a snapshot besides its bytes, and its wire form.

The RAM tier (``store``) and the durable tier (``durable``, ``objects``) both hold this
metadata; it lives below them so neither imports the other to know it.

Every snapshot that leaves the process carries a checksum over its state bytes and what
they mean (the token ids, the model's identity, the context length, the template), checked
before a restore: bytes flipped on disk or an object overwritten in the store must never
hand a conversation a state it did not compute.
"""

from __future__ import annotations

import hashlib
import json
import time
from array import array
from dataclasses import asdict, dataclass, field

from actors.engine.tokens import token_hash

EntryInfo = dict[str, str | int | float | bool]


@dataclass(frozen=True)
class Compat:
    """What a snapshot must share with the running engine to be restored."""

    model_id: str
    """Identity of the model file; a state of another model is never restored."""
    n_ctx: int = 0
    """Context length of the slots: a state's layout depends on it."""
    template: str = ""
    """Chat template the tokens were rendered with."""


@dataclass
class SnapshotMeta:
    """Everything about a snapshot except its bytes (what the durable index keeps)."""

    session: str
    """Session it belongs to."""
    tokens: tuple[int, ...]
    """Tokens whose KV state the snapshot holds."""
    nbytes: int
    """Size of the state."""
    model_id: str
    """Model the state belongs to."""
    n_ctx: int = 0
    """Context length of the slot it was taken from."""
    template: str = ""
    """Chat template of the tokens."""
    token_hash: str = ""
    """sha256 of ``tokens``."""
    created: float = field(default_factory=time.time)
    """Unix time of the snapshot."""
    last_access: float = field(default_factory=time.time)
    """Unix time of the last hit."""
    hits: int = 0
    """Times a turn restored it."""
    checksum: str = ""
    """sha256 of the state and its meaning (``snapshot_checksum``); set before it is made
    durable, and checked before a state read back is restored."""

    def __post_init__(self) -> None:
        if not self.token_hash:
            self.token_hash = token_hash(self.tokens)

    def fits(self, compat: Compat) -> str | None:
        """None when restorable under ``compat``, else the miss reason."""
        if self.model_id != compat.model_id or self.n_ctx != compat.n_ctx:
            return "model_mismatch"
        if self.template != compat.template:
            return "template_mismatch"
        return None

    def describe(self) -> EntryInfo:
        """Metadata for admin."""
        return {
            "session": self.session, "tokens": len(self.tokens), "token_hash": self.token_hash,
            "nbytes": self.nbytes, "created": self.created, "last_access": self.last_access,
            "hits": self.hits, "model_id": self.model_id,
        }


def snapshot_checksum(meta: SnapshotMeta, data: bytes) -> str:
    """sha256 over what a restore relies on: model, context, template, tokens and state.

    Not the session, the times or the hits: the same state claimed by another session of
    its trust domain keeps its checksum, and a hit changes nothing it covers.
    """
    head = json.dumps(
        [meta.model_id, meta.n_ctx, meta.template, meta.token_hash, len(meta.tokens),
         meta.nbytes], separators=(",", ":"),
    ).encode()
    h = hashlib.sha256(len(head).to_bytes(4, "little") + head)
    h.update(array("i", meta.tokens).tobytes())
    h.update(data)
    return h.hexdigest()


def sealed(meta: SnapshotMeta, data: bytes) -> SnapshotMeta:
    """``meta`` with its checksum set (computed once, where the bytes are trusted)."""
    if not meta.checksum:
        meta.checksum = snapshot_checksum(meta, data)
    return meta


def intact(meta: SnapshotMeta, data: bytes) -> bool:
    """True when ``data`` is the state ``meta`` describes: its size, its token hash and its
    checksum agree (a snapshot without a checksum is not trusted)."""
    return (
        bool(meta.checksum) and len(data) == meta.nbytes
        and meta.token_hash == token_hash(meta.tokens)
        and meta.checksum == snapshot_checksum(meta, data)
    )


def meta_to_json(meta: SnapshotMeta) -> bytes:
    """Wire form of a snapshot's metadata."""
    body = asdict(meta)
    body["tokens"] = list(meta.tokens)
    return json.dumps(body, separators=(",", ":")).encode()


def meta_from_json(raw: bytes) -> SnapshotMeta:
    """Metadata from ``meta_to_json``; raises ValueError when it is not that."""
    try:
        body = json.loads(raw)
        body["tokens"] = tuple(int(t) for t in body["tokens"])
        return SnapshotMeta(**body)
    except (TypeError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"not snapshot metadata: {e}") from e
