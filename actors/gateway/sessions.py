"""Which session a chat completion continues, and what it must send so the turn pays only
for its new messages.

A named session (``X-Session-Id`` or ``metadata.session_id``) is compared with the
conversation the gateways recorded for it at its last commit; a stateless call (the OpenAI
default: the whole conversation every time) is matched against every committed
conversation of its agent by hash chain. Either way only the unseen messages are sent, with
``expect_generation`` so a session that moved on meanwhile is never appended to blindly: the
node answers 409 and the call forks instead. A fork is a new session seeded with the whole
conversation; the engine's bank is content-addressed, so its KV state up to the divergence
is restored from the snapshots the original session left, not recomputed.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from actors.gateway.chain import ConversationIndex, chain, common_prefix
from schemas.chat import ChatMessage
from schemas.errors import ErrorCode, InferError
from schemas.gateway import SessionChain
from schemas.subjects import is_session_id

_MAX_SESSION = 128


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

    @property
    def new_messages(self) -> tuple[ChatMessage, ...]:
        """What the session has not seen."""
        return self.messages[self.base:]


def node_session(agent: str, visible: str) -> str:
    """The node's id of an agent's session (agents never share a namespace)."""
    return f"{agent}_{visible}" if agent else visible


class SessionRouter:
    """Plans calls against the conversation index, and records what they committed."""

    def __init__(self, index: ConversationIndex) -> None:
        self.index = index

    async def plan(
        self, agent: str, named: str | None, messages: Sequence[ChatMessage]
    ) -> Plan:
        """Where a call with ``messages`` goes."""
        msgs = tuple(messages)
        links = tuple(chain(agent, msgs))
        if named is not None:
            return await self._plan_named(agent, _check_visible(agent, named), msgs, links)
        hit = await self.index.longest_prefix(links, len(msgs) - 1)
        if hit is None:
            return self._fresh(agent, _new_id("chat"), msgs, links)
        n, entry = hit
        visible = entry.session[len(agent) + 1:] if agent else entry.session
        return Plan(agent, visible, entry.session, msgs, links, n, entry.generation)

    def fork(self, plan: Plan) -> Plan:
        """A new session seeded with the call's whole conversation."""
        stem = plan.visible[: _MAX_SESSION - len(plan.agent) - 14]
        fresh = self._fresh(plan.agent, _new_id(stem), plan.messages, plan.links)
        return replace(fresh, forked=True)

    async def committed(self, plan: Plan, answer: ChatMessage, generation: int) -> None:
        """The call's turn committed ``answer`` at ``generation``: index the conversation."""
        links = (*plan.links, *chain(plan.agent, (answer,), plan.links))
        await self.index.committed(links, plan.session, generation)
        await self.index.put_session_chain(
            SessionChain(session=plan.session, generation=generation, chain=links)
        )

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

    async def _plan_named(
        self, agent: str, visible: str, msgs: tuple[ChatMessage, ...], links: tuple[str, ...]
    ) -> Plan:
        session = node_session(agent, visible)
        known = await self.index.session_chain(session)
        if known is None:
            return Plan(agent, visible, session, msgs, links, 0, 0)
        plan = Plan(agent, visible, session, msgs, links, len(known.chain), known.generation)
        shared = common_prefix(links, known.chain)
        if known.retired or shared < len(known.chain):
            return self.fork(plan)
        if shared == len(msgs):
            raise InferError(
                ErrorCode.BAD_REQUEST,
                f"session {visible} already holds every message of this request; add the "
                "new message to answer",
                {"param": "messages"},
            )
        return plan

    @staticmethod
    def _fresh(
        agent: str, visible: str, msgs: tuple[ChatMessage, ...], links: tuple[str, ...]
    ) -> Plan:
        return Plan(agent, visible, node_session(agent, visible), msgs, links, 0, 0)


def _new_id(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:12]}"


def _check_visible(agent: str, visible: str) -> str:
    if not is_session_id(visible) or len(node_session(agent, visible)) > _MAX_SESSION:
        raise InferError(
            ErrorCode.BAD_REQUEST,
            f"session id {visible[:64]!r} is not valid: use 1-{_MAX_SESSION - len(agent) - 1} "
            "letters, digits, '_' or '-'",
            {"param": "X-Session-Id"},
        )
    return visible
