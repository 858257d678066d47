"""Admin verbs: health, sessions, one session's history, metrics, delete.

Every node answers health, sessions and metrics (each in its own queue group), so a client
gathers the whole cluster's; one session's history is answered by the node owning the
session, and a delete by any one node, which has the owner carry it out.

Each verb is an endpoint of the node's micro service (``node/service.py``), which turns the
reply model, or a raised ``InferError``, into the answer.

It reads the actors' state in-process (it is part of the node's wiring, not an actor of the
data path) and reads history from the record log with the reader the runners rebuild from.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

from nats.aio.client import Client

from actors.base import Actor, encode, parse_reply
from actors.session.host import RunnerHost
from actors.session.records import read_log
from schemas.admin import (
    BankEntryInfo,
    CountTokensReply,
    CountTokensRequest,
    DeleteReply,
    HealthReply,
    HistoryItemInfo,
    HistoryReply,
    MetricsReply,
    SessionRequest,
    SessionsReply,
    SessionSummary,
)
from schemas.errors import ErrorCode, InferError
from schemas.internal import SessionDeleteReply, SessionDeleteRequest
from schemas.records import CommitRecord, Record
from schemas.subjects import Subjects, is_session_id

if TYPE_CHECKING:
    from actors.engine.bank.meta import EntryInfo
    from actors.engine.engine import SlotEngine
    from node.metrics import NodeMetrics


class NodeView(Protocol):
    """What admin reads of the node it serves (``node.app.Node``, or a test's node)."""

    @property
    def engine(self) -> SlotEngine | None: ...
    @property
    def actors(self) -> list[Actor]: ...
    @property
    def metrics(self) -> NodeMetrics: ...


class AdminActor(Actor):
    """Answers ``<prefix>.admin.*``."""

    name = "admin"

    def __init__(self, nc: Client, subjects: Subjects, node: NodeView) -> None:
        super().__init__(nc, subjects)
        self.node = node
        self.started = time.time()

    async def start(self) -> None:
        """Nothing to subscribe: the verbs are endpoints of the node's micro service."""

    def _host(self) -> RunnerHost:
        return next(a for a in self.node.actors if isinstance(a, RunnerHost))

    def _members(self) -> tuple[str, ...]:
        return tuple(sorted(self._host().ownership.members))

    async def on_health(self, data: bytes) -> HealthReply:
        """Health of the node."""
        engine = self.node.engine
        assert engine is not None
        info = engine.info
        host = self._host()
        return HealthReply(
            status="ok" if info.snapshots else "degraded", engine=info.engine, model=info.model,
            n_ctx=info.n_ctx, slots=info.n_slots, snapshots=info.snapshots,
            snapshot_note=info.snapshot_note, sessions=len(self._host().runners),
            uptime_s=time.time() - self.started, bank_tiers=_tiers(engine),
            node=host.ownership.node, partitions=tuple(sorted(host.ownership.held())),
            turns_in_flight=host.inflight(), slots_busy=engine.pool.busy_count(),
            pending=sum(len(r.state.pending) for r in host.runners.values()),
            members=self._members(),
        )

    async def on_sessions(self, data: bytes) -> SessionsReply:
        """A summary of every session: log, slot, bank entries and the last turn's cache."""
        engine = self.node.engine
        assert engine is not None
        out = []
        node = self._host().ownership.node
        for sid, runner in sorted(self._host().runners.items()):
            slot = engine.pool.resident(sid)
            entries = engine.bank.session_entries(sid) if engine.bank else []
            last = engine.turn_stats.last.get(sid)
            out.append(SessionSummary(
                session=sid, generation=runner.state.generation,
                records=runner.state.history_len(), pending=len(runner.state.pending),
                busy=runner.turn is not None, slot=slot.index if slot else None,
                bank=tuple(_entry_info(e) for e in entries),
                last_cache_source=last.source if last else None,
                last_miss_reason=last.miss_reason if last else None,
                last_cached_tokens=last.cached_tokens if last else 0,
                last_prompt_tokens=last.prompt_tokens if last else 0, node=node,
            ))
        return SessionsReply(sessions=tuple(out), node=node, members=self._members())

    async def on_session(self, data: bytes) -> HistoryReply | None:
        """The record log of one session, honest about aborted turns; None (no reply) on a
        node that does not own the session's partition: its owner answers."""
        req = SessionRequest.model_validate_json(data, strict=True)
        if is_session_id(req.session) and not self._host().ownership.owns(req.session):
            return None
        runner = self._host().runners.get(req.session)
        if runner is None:
            gone = req.session in self._host().tombstones
            code = ErrorCode.GONE if gone else ErrorCode.UNKNOWN_SESSION
            raise InferError(code, f"session {req.session} does not exist")
        log = read_log(self.nc.jetstream(), self.subjects, req.session)
        records = mark_window([r async for _, r in log])
        return HistoryReply(
            session=req.session, generation=runner.state.generation, records=tuple(records)
        )

    async def on_count_tokens(self, data: bytes) -> CountTokensReply:
        """Tokens of a fresh turn's prompt over a conversation, by this node's template and
        tokenizer (off the loop: a long conversation takes a while to render)."""
        req = CountTokensRequest.model_validate_json(data)
        engine = self.node.engine
        assert engine is not None
        n = await asyncio.to_thread(engine.count_tokens, req.messages, req.tools)
        return CountTokensReply(prompt_tokens=n)

    async def on_metrics(self, data: bytes) -> MetricsReply:
        """The node's metric families: the numbers its Prometheus endpoint serves."""
        reply = self.node.metrics.reply()
        return reply.model_copy(
            update={"node": self._host().ownership.node, "members": self._members()}
        )

    async def on_delete(self, data: bytes) -> DeleteReply:
        """Delete a session: waits for an in-flight commit; its bank entries go too."""
        req = SessionRequest.model_validate_json(data, strict=True)
        if not is_session_id(req.session):
            raise InferError(ErrorCode.BAD_REQUEST, f"{req.session[:64]!r} is not a session id")
        reply = await self.nc.request(
            self.subjects.session_control(req.session),
            encode(SessionDeleteRequest(session=req.session)), timeout=60,
        )
        done: SessionDeleteReply = parse_reply(reply.data, reply.headers, SessionDeleteReply)
        return DeleteReply(session=done.session)


def mark_window(records: list[Record]) -> list[HistoryItemInfo]:
    """Describe ``records``, marking the messages the model no longer sees.

    The newest commit that names a window start decides: every message logged before that
    record, except the leading system messages (they always stay), is out of the window.
    """
    window_from = next(
        (r.window_from for r in reversed(records) if isinstance(r, CommitRecord)), None
    )
    out, before, head = [], window_from is not None, True
    for r in records:
        info = _describe(r)
        message = getattr(r, "message", None)
        if r.id == window_from:
            before = False
        if message is not None:
            head = head and message.role == "system"
            info = info.model_copy(update={"in_window": not (before and not head)})
        out.append(info)
    return out


def _describe(r: Record) -> HistoryItemInfo:
    kind = r.type.split(".")[1]
    message = getattr(r, "message", None)
    status = {"assistant": "committed", "provisional": "ABORTED"}.get(kind)
    return HistoryItemInfo(
        kind=kind, id=r.id, role=message.role if message else None,
        content=message.content if message else None, turn_id=getattr(r, "turn_id", None),
        generation=getattr(r, "generation", None), supersedes=getattr(r, "supersedes", None),
        reason=getattr(r, "reason", None), status=status,
        parent_ids=getattr(r, "parent_ids", ()),
    )


def _entry_info(e: EntryInfo) -> BankEntryInfo:
    return BankEntryInfo(
        tokens=int(e["tokens"]), token_hash=str(e["token_hash"]), nbytes=int(e["nbytes"]),
        hits=int(e["hits"]), created=float(e["created"]), last_access=float(e["last_access"]),
        tier=str(e["tier"]), model_id=str(e["model_id"]),
    )


def _tiers(engine: SlotEngine) -> tuple[str, ...]:
    if engine.bank is None:
        return ()
    durable = engine.bank.durable
    return ("ram", *(durable.names if durable else ()))
