"""Which session a chat completion continues, and what it must send so the turn pays only
for its new messages.

A stateless call (the OpenAI default: the whole conversation every time) is matched against
every committed conversation of its agent by hash chain. A call with an affinity hint (the
agent's own conversation id: ``X-Session-Id``, Claude Code's and Codex's session headers,
``prompt_cache_key``, ``metadata``) continues the session under that hint whose committed
conversation is the longest prefix of its messages; one hint holds a few sessions (an
agent's title and summary requests run under its main conversation's id with another
system prompt), and a session with a turn running is no candidate. A call no session
extends forks. Either way only the unseen messages are sent, with ``expect_generation`` so
a session that moved on meanwhile is never appended to blindly: the node answers 409 and
the call forks instead. A fork is a new session seeded with the whole conversation; the
engine's bank is content-addressed, so its KV state up to the divergence is restored from
the snapshots the original session left, not recomputed.

The bank shares a prefix only within one trust domain (``actors/engine/bank/domains.py``):
an agent's sessions ``<agent>_<rest>`` are its domain. A gateway without API keys lets every
HTTP client name every session, so its clients are one principal; it names the stateless
sessions it starts ``chat_<id>`` (and their forks ``chat_<id>-<id>``), one domain, so a call
that rewrites an earlier message (aider moves its reminder into the newest user message)
still restores the history it shares with the conversation it came from.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import structlog

from actors.gateway.chain import ConversationIndex, chain, common_prefix
from schemas.chat import ChatMessage
from schemas.gateway import SessionChain
from schemas.subjects import is_session_id

log = structlog.get_logger("gateway")

_MAX_SESSION = 128
_HINT_CHARS = 64
"""Longest hint used as a session id as it is (with a 32-character agent and a fork's
suffix it still fits ``_MAX_SESSION``); a longer or odd one is named by its digest."""
HINT_HEADERS = (
    "x-session-id", "x-claude-code-session-id", "session_id", "session-id",
    "conversation_id", "conversation-id", "thread-id", "thread_id",
)
"""Headers agents send with their own conversation id, first found wins: opencode's
``x-session-id``, Claude Code's, Codex's ``session_id`` (older ones ``conversation_id``)."""


def affinity_hint(headers: Mapping[str, str], *in_body: str | None) -> str | None:
    """The conversation id a request carries (its headers first, then the body's own keys
    in the order given), as a session id: one that is not a short session id is named by
    its digest."""
    hint = next((headers[h] for h in HINT_HEADERS if headers.get(h)), None)
    hint = hint or next((h for h in in_body if h), None)
    if not hint:
        return None
    if is_session_id(hint) and len(hint) <= _HINT_CHARS:
        return hint
    return "h-" + hashlib.sha256(hint.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Plan:
    """Where one call goes and what it sends."""

    agent: str
    """Owner of the session ('' without API keys)."""
    visible: str
    """Session id the client sees (``X-Session-Id`` of the response)."""
    session: str
    """Session id on the node (scoped to the agent)."""
    messages: tuple[ChatMessage, ...]
    """The call's whole conversation."""
    links: tuple[str, ...]
    """Its hash chain."""
    base: int
    """Messages the session already holds; ``messages[base:]`` are sent."""
    expect_generation: int
    """The generation the session must be at."""
    forked: bool = False
    """True when this call starts a fork."""
    hint: str | None = None
    """The affinity hint the call came with; its commit files the session under it."""

    @property
    def new_messages(self) -> tuple[ChatMessage, ...]:
        """What the session has not seen."""
        return self.messages[self.base:]


def node_session(agent: str, visible: str) -> str:
    """The node's id of an agent's session (agents never share a namespace)."""
    return f"{agent}_{visible}" if agent else visible


def visible_session(agent: str, session: str) -> str:
    """The id a client sees of the node's session ``session``."""
    return session[len(agent) + 1:] if agent else session


def hint_digest(agent: str, hint: str) -> str:
    """The key of an agent's hint (another agent's same hint is another key)."""
    return hashlib.sha256(f"{agent}\0{hint}".encode()).hexdigest()


class SessionRouter:
    """Plans calls against the conversation index, and records what they committed."""

    def __init__(self, index: ConversationIndex) -> None:
        self.index = index

    async def plan(
        self, agent: str, hint: str | None, messages: Sequence[ChatMessage],
        busy: Callable[[str], bool] = lambda session: False,
    ) -> Plan:
        """Where a call with ``messages`` goes; a session for which ``busy`` is true (a turn
        of it running) is not continued."""
        msgs = tuple(messages)
        links = tuple(chain(agent, msgs))
        if hint is not None:
            return await self._plan_hinted(agent, hint, msgs, links, busy)
        hit = await self.index.longest_prefix(links, len(msgs) - 1)
        if hit is None:
            return self._fresh(agent, stateless_id(agent), msgs, links)
        n, entry = hit
        return Plan(agent, visible_session(agent, entry.session), entry.session, msgs, links,
                    n, entry.generation)

    def fork(self, plan: Plan) -> Plan:
        """A new session seeded with the call's whole conversation."""
        stem = plan.visible[: _MAX_SESSION - len(plan.agent) - 14]
        fresh = self._fresh(plan.agent, _new_id(stem), plan.messages, plan.links)
        return replace(fresh, forked=True, hint=plan.hint)

    async def committed(self, plan: Plan, answer: ChatMessage, generation: int) -> None:
        """The call's turn committed ``answer`` at ``generation``: index the conversation."""
        links = (*plan.links, *chain(plan.agent, (answer,), plan.links))
        await self.index.committed(links, plan.session, generation)
        await self.index.put_session_chain(
            SessionChain(session=plan.session, generation=generation, chain=links)
        )
        if plan.hint is not None:
            await self.index.hinted(hint_digest(plan.agent, plan.hint), plan.session)

    async def aborted(self, plan: Plan) -> None:
        """The call's turn was aborted: the session holds its input as unanswered context,
        so no later call continues it; they fork from the committed part instead."""
        if plan.base > 0:
            await self.index.forget_prefix(plan.links[plan.base - 1])
        known = await self.index.session_chain(plan.session)
        chain_links = known.chain if known is not None else plan.links[: plan.base]
        await self.index.put_session_chain(SessionChain(
            session=plan.session, generation=plan.expect_generation, chain=chain_links,
            retired=True,
        ))

    async def _plan_hinted(
        self, agent: str, hint: str, msgs: tuple[ChatMessage, ...], links: tuple[str, ...],
        busy: Callable[[str], bool],
    ) -> Plan:
        """The longest session under ``hint`` that the call extends, else the hint's own
        session while it is new, else a fork."""
        own = node_session(agent, hint)
        under = await self.index.hint_sessions(hint_digest(agent, hint))
        names = [s for s in dict.fromkeys((*under, own)) if not busy(s)]
        chains = await asyncio.gather(*(self.index.session_chain(s) for s in names))
        best: SessionChain | None = None
        for known in chains:
            if known is None or known.retired or len(known.chain) >= len(links):
                continue
            if common_prefix(links, known.chain) == len(known.chain) and (
                best is None or len(known.chain) > len(best.chain)
            ):
                best = known
        if best is not None:
            return Plan(agent, visible_session(agent, best.session), best.session, msgs, links,
                        len(best.chain), best.generation, hint=hint)
        plan = Plan(agent, hint, own, msgs, links, 0, 0, hint=hint)
        if own in names and own not in under and chains[names.index(own)] is None:
            return plan
        log.info("gateway_hint_forked", hint=hint, sessions=len(under),
                 busy=len({*under, own}) - len(names))
        return self.fork(plan)

    @staticmethod
    def _fresh(
        agent: str, visible: str, msgs: tuple[ChatMessage, ...], links: tuple[str, ...]
    ) -> Plan:
        return Plan(agent, visible, node_session(agent, visible), msgs, links, 0, 0)


STATELESS_STEM = "chat"
"""The stem of stateless sessions; without API keys also their trust domain's name."""


def stateless_id(agent: str) -> str:
    """A new stateless session's visible id: an agent's ``chat-<id>`` (its sessions are its
    domain already), without API keys ``chat_<id>``, in the one domain of keyless calls."""
    if agent:
        return _new_id(STATELESS_STEM)
    return f"{STATELESS_STEM}_{uuid.uuid4().hex[:12]}"


def _new_id(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:12]}"
