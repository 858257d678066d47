"""What OpenAI gateways keep in JetStream KV: where a conversation continues, and answers.

Several gateways may front one node and any of them may be restarted, so none of this lives
in a gateway's memory: a stateless client's next call finds its session from any gateway.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from schemas.chat import ChatMessage, Frozen

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


class HintSessions(Frozen):
    """Under ``h.<hint hash>``: the sessions an agent's affinity hint (its own conversation id,
    such as opencode's ``x-session-id``) has committed turns in, most recently used first.

    One hint holds several conversations (an agent's title or summary requests run under its
    main conversation's id with another system prompt), so a call continues whichever of them
    its messages extend."""

    type: Literal["gateway_hint.v1"] = "gateway_hint.v1"
    """Message type and version."""
    sessions: tuple[str, ...]
    """The node's session ids, most recently committed first."""


class IdempotencyEntry(Frozen):
    """Under ``i.<key hash>``: a request with an ``Idempotency-Key``, claimed, then answered.

    The gateway that creates the key runs the turn; every other request with the key, on
    any gateway, waits for the answer (or for the claim to go, or to expire)."""

    type: Literal["gateway_idempotency.v1"] = "gateway_idempotency.v1"
    """Message type and version."""
    request: Digest
    """Hash of the request the key was first used with; another body is refused (422)."""
    claimed_until: float
    """Unix time after which an unanswered claim is taken to be dead (its gateway gone)."""
    session: str | None = None
    """Session id the client saw (``X-Session-Id``); None until answered."""
    completion: str | None = None
    """The chat completion object, as JSON; None until answered."""


class ResponseRecord(Frozen):
    """Under ``r.<response id>``: a stored Responses API answer, for ``previous_response_id``.

    The conversation is kept whole (the answer's own message last), so a request naming the
    response sends only its new items and the gateway still knows the conversation they
    continue; its session is where that conversation's KV state lives."""

    type: Literal["gateway_response.v1"] = "gateway_response.v1"
    """Message type and version."""
    agent: str
    """The agent that owns the response ('' without API keys); no other agent may use it."""
    session: str
    """The session id the client saw (visible, not scoped to the agent)."""
    instructions: str | None = None
    """The response's ``instructions`` (its system message; not carried to the next one)."""
    messages: tuple[ChatMessage, ...]
    """The conversation after ``instructions``, ending with the response's answer."""


def prefix_key(link: str) -> str:
    """KV key of the conversation whose hash chain ends in ``link``."""
    return f"p.{link}"


def session_key(session: str) -> str:
    """KV key of a named session's chain."""
    return f"s.{session}"


def hint_key(digest: str) -> str:
    """KV key of the sessions under an affinity hint (``digest``: the hint scoped to its agent)."""
    return f"h.{digest}"


def response_key(response_id: str) -> str:
    """KV key of a stored Responses API answer."""
    return f"r.{response_id}"


def answer_key(digest: str) -> str:
    """KV key of the answer kept for a scoped idempotency key."""
    return f"i.{digest}"
