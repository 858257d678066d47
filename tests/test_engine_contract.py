"""The engine's wire protocol, held to one contract, and an abort measured at node level.

The scripted engine (``tests/fake_engine.py``) stands in for the real engine actor in the
invariant tests, so the same request/response sequence runs against both here: what the
runner and the bank committer rely on (reply shapes, token events, results, cancel and
status answers) must match, or the invariant tests prove nothing about the node.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

import actors.engine.engine as engine_module
from actors.base import encode
from actors.engine.engine import SlotEngine
from actors.engine.service import ENGINE_SERVES
from node.client import InfernodeClient
from schemas.chat import ChatMessage, SamplingParams
from schemas.internal import (
    AdoptReply,
    AdoptRequest,
    BankFlushReply,
    BankFlushRequest,
    CancelReply,
    CancelRequest,
    ForgetReply,
    ForgetRequest,
    GenerateRequest,
    GenerateResult,
    SnapshotReply,
    SnapshotRequest,
    TurnStatusReply,
    TurnStatusRequest,
)
from schemas.messages import TokenEvent
from schemas.records import ReplyParams
from schemas.subjects import EventKind, Subjects
from tests.fake_engine import FakeEngine
from tests.helpers import EventCollector
from tests.support.sessions import Session, send

GREEDY = SamplingParams(temperature=0.0)


class Wire:
    """One engine reached over NATS under its own subject prefix."""

    def __init__(self, nc: Client, prefix: str, node: str = "") -> None:
        self.nc = nc
        self.s = Subjects(prefix, node)  # a node's engine answers on its own subjects
        self.asked: list[str] = []
        """Every subject a request went to, to hold the sequence to all the engine serves."""

    def unasked(self) -> list[str]:
        """The engine's subjects (``ENGINE_SERVES``) no request of this wire went to."""
        return [
            served.name for served in ENGINE_SERVES
            if not any(_matches(served.subject(self.s), asked) for asked in self.asked)
        ]

    def generate_request(self, session: str, turn_id: str, max_tokens: int) -> GenerateRequest:
        return GenerateRequest(
            session=session,
            turn_id=turn_id,
            messages=(ChatMessage(role="user", content="say something"),),
            token_subject=self.s.events(session, EventKind.TOKEN),
            queue_ms=0.0,
            params=ReplyParams(sampling=GREEDY, max_tokens=max_tokens),
        )

    async def ask(self, subject: str, body: Any, timeout: float = 60.0) -> Msg:
        self.asked.append(subject)
        return await self.nc.request(subject, encode(body), timeout=timeout)

    async def status(self, session: str, turn_id: str) -> bytes:
        probe = TurnStatusRequest(session=session, turn_id=turn_id)
        data = (await self.ask(self.s.engine_turn_status(), probe)).data
        TurnStatusReply.model_validate_json(data)
        return data

    async def cancel(self, session: str, turn_id: str) -> bytes:
        cancel = CancelRequest(session=session, turn_id=turn_id)
        data = (await self.ask(self.s.engine_cancel(session), cancel)).data
        CancelReply.model_validate_json(data)
        return data


def _matches(pattern: str, subject: str) -> bool:
    """Whether NATS delivers ``subject`` to a subscription on ``pattern`` (``*``, ``>``)."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or token not in ("*", got[i]):
            return False
    return len(want) == len(got)


async def run_sequence(wire: Wire, hold_long_turn: Any) -> dict[str, Any]:
    """The sequence a runner and a bank committer drive; what came back, comparable."""
    out: dict[str, Any] = {}
    session = "contract"
    tokens = await EventCollector.start(wire.nc, wire.s.events(session, EventKind.TOKEN))
    out["status_unknown"] = await wire.status(session, "turn_none")
    out["cancel_unknown"] = await wire.cancel(session, "turn_none")

    reply = await wire.ask(wire.s.engine_generate(), wire.generate_request(session, "turn_a", 4))
    result = GenerateResult.model_validate_json(reply.data)
    await tokens.wait_until(lambda ms: len(ms) >= result.usage.completion_tokens and bool(ms))
    events = [TokenEvent.model_validate_json(m.data) for m in tokens.messages]
    out["result_keys"] = sorted(json.loads(reply.data))
    out["token_keys"] = sorted(json.loads(tokens.messages[0].data))
    out["first"] = {
        "session": result.session, "turn_id": result.turn_id, "error": result.error,
        "finish_ok": result.finish_reason in ("stop", "length"),
        "text_is_tokens": result.raw_text == "".join(e.text for e in events),
        "indices": [e.index for e in events] == list(range(len(events))),
        "turn_ids": {e.turn_id for e in events}, "model_id_set": bool(result.model_id),
        "hash_set": bool(result.token_hash), "n_tokens_set": result.n_tokens > 0,
    }
    snap = await wire.ask(wire.s.engine_snapshot(), SnapshotRequest(
        session=session, generation=1, token_hash=result.token_hash, wait_s=5.0,
    ))
    out["snapshot_type"] = SnapshotReply.model_validate_json(snap.data).type

    await hold_long_turn(session)
    before = len(tokens.messages)
    running = asyncio.ensure_future(
        wire.ask(wire.s.engine_generate(), wire.generate_request(session, "turn_b", 1500))
    )
    await tokens.wait_until(lambda ms: len(ms) > before, timeout=30)
    out["status_running"] = await wire.status(session, "turn_b")
    out["status_other_turn"] = await wire.status(session, "turn_a")
    out["cancel_running"] = await wire.cancel(session, "turn_b")
    cut = GenerateResult.model_validate_json((await running).data)
    out["cut"] = {"finish": cut.finish_reason, "turn_id": cut.turn_id, "error": cut.error}
    out["status_after"] = await wire.status(session, "turn_b")
    flush = await wire.ask(wire.s.engine_bank_flush(), BankFlushRequest(
        commits={session: result.token_hash}, wait_s=5.0,
    ))
    out["bank_flush"] = BankFlushReply.model_validate_json(flush.data)
    adopt = await wire.ask(wire.s.engine_adopt(), AdoptRequest(sessions=(session,)))
    out["adopt"] = AdoptReply.model_validate_json(adopt.data)
    forget = await wire.ask(wire.s.engine_forget(), ForgetRequest(session=session))
    out["forget"] = ForgetReply.model_validate_json(forget.data)
    await tokens.stop()
    return out


@pytest.mark.timeout(120)
async def test_the_scripted_engine_answers_the_same_sequence_as_the_real_engine_actor(
    make_node, nc: Client
):
    """Given the real engine actor (tiny GGUF) and the scripted engine on one server, when
    the same requests go to each, one on every subject the engine serves, then their
    replies, token events and results agree in shape and in meaning."""
    node = await make_node(threads=1)  # the real engine actor, on prefix "infer"
    fake = FakeEngine(nc, Subjects("fake"))
    await fake.start()

    async def hold_fake(session: str) -> None:
        fake.hold(session, after=1, tokens=("a", "b", "c"))

    async def hold_real(session: str) -> None:
        """The real turn of 1,500 tokens is still running when it is cancelled."""

    real_wire, fake_wire = Wire(nc, "infer", node.node_id), Wire(nc, "fake")
    try:
        real = await run_sequence(real_wire, hold_real)
        scripted = await run_sequence(fake_wire, hold_fake)
    finally:
        await fake.stop()
    assert real_wire.unasked() == [] and fake_wire.unasked() == []
    assert real["first"]["finish_ok"] and real["first"]["error"] is None
    assert real["cut"] == {"finish": "aborted", "turn_id": "turn_b", "error": None}
    assert TurnStatusReply.model_validate_json(real["status_running"]).running
    assert not TurnStatusReply.model_validate_json(real["status_after"]).running
    assert CancelReply.model_validate_json(real["cancel_running"]).cancelled
    assert scripted == real


@pytest.mark.timeout(120)
async def test_an_abort_over_nats_stops_the_real_engine_within_one_token(
    make_node, nc: Client, monkeypatch: pytest.MonkeyPatch
):
    """Given a long greedy turn streaming on the real engine, when an agent aborts it over
    NATS, then at most one token is generated after the cancel reaches the engine and at
    most one token event arrives after the abort reply."""
    emitted: list[str] = []
    at_cancel: list[int] = []
    real_decode, real_cancel = engine_module.decode, SlotEngine.cancel

    def counting_decode(backend, slot, sampling, stop, max_tokens, emit, cancel, *rest):  # noqa: ANN001
        def counted(text: str) -> None:
            emitted.append(text)
            emit(text)
        return real_decode(backend, slot, sampling, stop, max_tokens, counted, cancel, *rest)

    def noting_cancel(self: SlotEngine, session: str, reason: str = "client") -> bool:
        at_cancel.append(len(emitted))
        return real_cancel(self, session, reason)

    monkeypatch.setattr(engine_module, "decode", counting_decode)
    monkeypatch.setattr(SlotEngine, "cancel", noting_cancel)
    node = await make_node(threads=1, bank_ram_bytes=0)
    watch = await Session.watch(nc, "stop")
    await send(nc, "stop", "tell me everything", sampling=GREEDY, max_tokens=1800)
    await watch.until(lambda s: len(s.of("token")) >= 3, timeout=30)
    async with InfernodeClient(node.url, nc=nc) as client:
        reply = await client.abort("stop")
        seen_at_reply = len([t for t in watch.of("token") if t["turn_id"] == reply.turn_id])
        assert reply.aborted
        await watch.aborted()
    await nc.flush()
    streamed = [t for t in watch.of("token") if t["turn_id"] == reply.turn_id]
    assert len(at_cancel) == 1 and len(emitted) - at_cancel[0] <= 1, (at_cancel, len(emitted))
    assert len(streamed) - seen_at_reply <= 1
    assert len(streamed) == len(emitted) < 1800
    assert watch.of("provisional")[0]["text"] == "".join(t["text"] for t in streamed)
