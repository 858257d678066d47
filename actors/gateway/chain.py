"""Conversations by hash chain, indexed in JetStream KV: how a stateless call finds its session.

Hash ``i`` of a conversation covers its messages ``0..i`` and the agent that owns it, so
one agent's conversation can never be continued by another. After every committed turn the
gateway stores ``p.<hash of the conversation so far>`` → (session, generation); a later call
that resends that conversation plus new messages finds the session by looking its prefixes
up, longest first, and sends only the new messages. The index lives in a KV bucket, so it
outlives a gateway restart and is shared by every gateway in front of the node.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import TypeVar

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from actors.replicas import keep_replicas, placing
from schemas.chat import ChatMessage
from schemas.gateway import (
    ConversationEntry,
    HintSessions,
    SessionChain,
    hint_key,
    prefix_key,
    session_key,
)
from schemas.subjects import Subjects

M = TypeVar("M", ConversationEntry, SessionChain, HintSessions)

ANSWER_TTL_S = 24 * 3600.0
"""How long an ``Idempotency-Key`` answer is kept for retries."""
KNOWN_ENTRIES = 65_536
"""Prefix entries a gateway keeps in memory (about 10 MiB)."""
MAX_LOOKUPS = 64
"""Longest conversations try their 64 longest prefixes (a new conversation stops there)."""
SESSIONS_PER_HINT = 8
"""Sessions one affinity hint keeps (least recently committed out first): a main
conversation and its side requests, and a few forks of it."""


def canonical(message: ChatMessage) -> bytes:
    """The bytes of a message that decide whether two messages are the same."""
    calls = [
        [c.id, c.function.name, _same_json(c.function.arguments)]
        for c in message.tool_calls or ()
    ]
    return json.dumps(
        [message.role, message.content or "", message.name, message.tool_call_id, calls],
        separators=(",", ":"), ensure_ascii=False,
    ).encode()


def _same_json(arguments: str) -> str:
    """Arguments as one spelling of their JSON: a streaming client adds the pieces up and
    may echo them spaced differently from the parsed call the gateway indexed."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain(agent: str, messages: Sequence[ChatMessage], after: Sequence[str] = ()) -> list[str]:
    """Hash ``i`` covers the agent and messages ``0..i`` (continuing the chain ``after``)."""
    out: list[str] = []
    if after:
        link = bytes.fromhex(after[-1])
    else:
        link = hashlib.sha256(b"infernode-conversation-v1\0" + agent.encode()).digest()
    for m in messages:
        link = hashlib.sha256(link + canonical(m)).digest()
        out.append(link.hex())
    return out


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading links two chains share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ConversationIndex:
    """The KV buckets of the gateway: conversation prefixes, named sessions, answers."""

    def __init__(self, conversations: KeyValue, answers: KeyValue) -> None:
        self.conversations = conversations
        self.answers = answers
        # Prefix entries this gateway read or wrote. A stale one is harmless: the call sends
        # its generation as expect_generation, and a session that moved on answers 409 (a
        # fork), so the bucket is read only on a miss.
        self._known: OrderedDict[str, ConversationEntry] = OrderedDict()

    @classmethod
    async def open(
        cls, js: JetStreamContext, subjects: Subjects, replicas: int = 1
    ) -> ConversationIndex:
        """Bind the buckets (with ``replicas`` copies), creating them on first use."""
        conversations = await _bucket(js, KeyValueConfig(
            bucket=subjects.gateway_bucket, history=1, storage=StorageType.FILE,
            description="infernode gateway: committed conversations by hash chain",
            replicas=replicas,
        ))
        answers = await _bucket(js, KeyValueConfig(
            bucket=subjects.gateway_answers_bucket, history=1, ttl=ANSWER_TTL_S,
            storage=StorageType.FILE, description="infernode gateway: idempotent answers",
            replicas=replicas,
        ))
        return cls(conversations, answers)

    async def longest_prefix(
        self, links: Sequence[str], upto: int
    ) -> tuple[int, ConversationEntry] | None:
        """The longest of the first ``upto`` prefixes that is a committed conversation."""
        for n in range(upto, max(upto - MAX_LOOKUPS, 0), -1):
            key = prefix_key(links[n - 1])
            entry = self._known.get(key)
            if entry is None:
                entry = await self._get(self.conversations, key, ConversationEntry)
            if entry is not None:
                self._remember(key, entry)
                return n, entry
        return None

    def _remember(self, key: str, entry: ConversationEntry) -> None:
        self._known[key] = entry
        self._known.move_to_end(key)
        while len(self._known) > KNOWN_ENTRIES:
            self._known.popitem(last=False)

    async def committed(self, links: Sequence[str], session: str, generation: int) -> None:
        """The conversation ``links`` is committed in ``session`` at ``generation``."""
        entry = ConversationEntry(session=session, generation=generation, messages=len(links))
        await self.conversations.put(prefix_key(links[-1]), entry.model_dump_json().encode())
        self._remember(prefix_key(links[-1]), entry)

    async def forget_prefix(self, link: str) -> None:
        """A conversation can no longer be continued where it was (its turn was aborted)."""
        self._known.pop(prefix_key(link), None)
        await self.conversations.delete(prefix_key(link))

    async def session_chain(self, session: str) -> SessionChain | None:
        """What the gateways know of a named session."""
        return await self._get(self.conversations, session_key(session), SessionChain)

    async def put_session_chain(self, value: SessionChain) -> None:
        """Record a named session's committed conversation."""
        await self.conversations.put(session_key(value.session), value.model_dump_json().encode())

    async def hint_sessions(self, hint: str) -> tuple[str, ...]:
        """The sessions under the affinity hint ``hint`` (a digest), most recent first."""
        entry = await self._get(self.conversations, hint_key(hint), HintSessions)
        return entry.sessions if entry is not None else ()

    async def hinted(self, hint: str, session: str) -> None:
        """``session`` committed a turn under ``hint``: it goes first, the oldest past
        ``SESSIONS_PER_HINT`` out. Compare-and-set, so gateways committing at once under one
        hint lose none of each other's sessions."""
        key = hint_key(hint)
        for _ in range(8):
            try:
                entry = await self.conversations.get(key)
            except KeyNotFoundError:
                entry = None
            known = _hint_list(entry)
            sessions = (session, *(s for s in known if s != session))[:SESSIONS_PER_HINT]
            value = HintSessions(sessions=sessions).model_dump_json().encode()
            try:
                if entry is None:
                    await self.conversations.create(key, value)
                else:
                    await self.conversations.update(key, value, last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue  # another commit under the hint came first: read it again

    @staticmethod
    async def _get(
        kv: KeyValue, key: str, model: type[M]
    ) -> M | None:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            return model.model_validate_json(entry.value)
        except ValidationError:  # written by another version: treat as unknown
            return None


def _hint_list(entry: KeyValue.Entry | None) -> tuple[str, ...]:
    if entry is None or not entry.value:
        return ()
    try:
        return HintSessions.model_validate_json(entry.value).sessions
    except ValidationError:  # written by another version: the hint starts afresh
        return ()


async def _bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    what = f"the KV bucket {config.bucket}"
    try:
        kv = await js.key_value(config.bucket)
    except BucketNotFoundError:
        async with placing(what, config.replicas):
            return await js.create_key_value(config)
    await keep_replicas(js, Subjects.kv_stream(config.bucket), what, config.replicas)
    return kv
