"""What OpenAI gateways keep in JetStream KV: where a conversation continues, and answers.

Several gateways may front one node and any of them may be restarted, so none of this lives
in a gateway's memory: a stateless client's next call finds its session from any gateway.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas.chat import Frozen

Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ConversationEntry(Frozen):
    """Under ``p.<chain hash>``: the session whose committed conversation has that hash."""

    type: Literal["gateway_conversation.v1"] = "gateway_conversation.v1"
    """Message type and version."""
    session: str
    """The node's session id (already scoped to the agent that owns it)."""
    generation: int
    """The session's committed generation right after that conversation."""
    messages: int
    """Messages in the conversation."""


class SessionChain(Frozen):
    """Under ``s.<session>``: the committed conversation of a named session, as hashes."""

    type: Literal["gateway_session.v1"] = "gateway_session.v1"
    """Message type and version."""
    session: str
    """The node's session id."""
    generation: int
    """Committed generation the chain belongs to."""
    chain: tuple[Digest, ...]
    """Hash chain over the committed messages: entry i covers messages 0..i."""
    retired: bool = False
    """True once a turn of this conversation was aborted: later calls start a fork."""


class StoredAnswer(Frozen):
    """Under ``i.<key hash>``: the answer of a request with an ``Idempotency-Key``."""

    type: Literal["gateway_answer.v1"] = "gateway_answer.v1"
    """Message type and version."""
    session: str
    """Session id the client saw (``X-Session-Id``)."""
    completion: str
    """The chat completion object, as JSON."""


def prefix_key(link: str) -> str:
    """KV key of the conversation whose hash chain ends in ``link``."""
    return f"p.{link}"


def session_key(session: str) -> str:
    """KV key of a named session's chain."""
    return f"s.{session}"


def answer_key(digest: str) -> str:
    """KV key of the answer kept for a scoped idempotency key."""
    return f"i.{digest}"
