"""A scripted engine for race tests, and a node built around it.

``FakeEngine`` speaks the engine actor's wire protocol exactly (``actors/engine/actor.py``):
a ``GenerateRequest`` on ``engine_generate`` is answered with ``TokenEvent``s on the
request's ``token_subject`` and then a ``GenerateResult`` to the reply inbox; a
``CancelRequest`` on ``engine_cancel.<session>`` stops the named turn (``CancelReply``);
``SnapshotRequest``, ``ForgetRequest``, ``AdoptRequest`` and ``BankFlushRequest`` are
answered as the real engine does (one without a durable bank tier). It subscribes from the
table the real engine subscribes from (``actors/engine/service.py``), so it serves every
engine subject by construction. Only the model is fake: its text is scripted, so tests can
hold a turn at a chosen token until they release it, make it fail, or overflow the context.

``FakeNode`` starts the node's real actors (admission, session runners, bank committer,
admin, the micro service) around it, built by ``node.wiring`` as ``node.app.Node`` builds
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from actors.admission import Admission
from actors.base import Actor, encode
from actors.engine.service import subscribe_engine
from actors.session.host import RunnerHost
from node.config import NodeConfig
from node.wiring import build_actors, prepare_streams
from schemas.chat import CacheInfo, Timings, Usage
from schemas.errors import ErrorCode
from schemas.internal import (
    AdoptReply,
    AdoptRequest,
    BankFlushReply,
    BankFlushRequest,
    CancelReply,
    CancelRequest,
    ErrorBody,
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
from schemas.subjects import Subjects

N_CTX = 2048
"""The context length the fake engine reports on an overflow."""


class Gate:
    """Holds a scripted turn at a token until released (or cancelled, if it listens)."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        """Set when the turn is held."""
        self.released = asyncio.Event()
        self.turn_id: str | None = None

    def release(self) -> None:
        """Let the held turn go on."""
        self.released.set()

    async def wait_reached(self, timeout: float = 10.0) -> str:
        """Wait until the turn is held; its turn id."""
        try:
            await asyncio.wait_for(self.reached.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"no turn was held within {timeout:g} s") from None
        assert self.turn_id is not None
        return self.turn_id


@dataclass
class Script:
    """How one turn of a session goes."""

    tokens: tuple[str, ...] | None = None
    """The pieces of the reply; None answers ``re: <last message>``."""
    hold_after: int | None = None
    """Hold after this many pieces until the gate is released."""
    gate: Gate | None = None
    ignore_cancel: bool = False
    """Keep holding through a cancel, as a turn whose result is already on its way."""
    error: ErrorCode | None = None
    """Fail the turn with this code (``context_overflow`` before any token)."""
    finish_reason: str = "stop"
    lose_reply: bool = False
    """Never deliver the result, as when a NATS reconnect drops it."""


@dataclass
class _Running:
    turn_id: str
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class FakeEngine(Actor):
    """Serves the engine's internal subjects with scripted turns."""

    name = "engine"

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        super().__init__(nc, subjects)
        self.scripts: dict[str, deque[Script]] = defaultdict(deque)
        self.any_scripts: deque[Script] = deque()
        """How the next turns of sessions without a script of their own go (a session id a
        gateway picks is not known beforehand)."""
        self.requests: list[GenerateRequest] = []
        self.cancels: list[CancelRequest] = []
        self.snapshots: list[SnapshotRequest] = []
        self.forgets: list[ForgetRequest] = []
        self.running: dict[str, _Running] = {}
        self.overlaps = 0
        """Turns that started while another turn of the same session ran (must stay 0)."""
        self._cancelled: dict[str, asyncio.Event] = defaultdict(asyncio.Event)

    # -- scripting ---------------------------------------------------------------------------
    def script(self, session: str, script: Script) -> None:
        """Queue how the next unscripted turn of ``session`` goes."""
        self.scripts[session].append(script)

    def hold(
        self, session: str, after: int = 1, tokens: tuple[str, ...] = ("par", "tial", " rest"),
        ignore_cancel: bool = False,
    ) -> Gate:
        """Hold the next turn of ``session`` after ``after`` pieces; the gate releases it."""
        gate = Gate()
        self.script(session, Script(tokens, after, gate, ignore_cancel))
        return gate

    def hold_any(self, after: int = 1, tokens: tuple[str, ...] = ("par", "tial")) -> Gate:
        """Hold the next turn of whichever unscripted session comes first, as ``hold``."""
        gate = Gate()
        self.any_scripts.append(Script(tokens, after, gate))
        return gate

    def fail(self, session: str, code: ErrorCode = ErrorCode.INTERNAL) -> None:
        """Fail the next turn of ``session`` with ``code``."""
        tokens = () if code == ErrorCode.CONTEXT_OVERFLOW else ("half",)
        self.script(session, Script(tokens=tokens, error=code))

    async def wait_cancel(self, turn_id: str, timeout: float = 10.0) -> None:
        """Wait until a cancel for ``turn_id`` arrived."""
        try:
            await asyncio.wait_for(self._cancelled[turn_id].wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"no cancel for {turn_id} within {timeout:g} s") from None

    # -- protocol ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe to every engine subject from the table the real engine subscribes from."""
        await subscribe_engine(self)

    async def on_generate(self, msg: Msg) -> None:
        """Run a turn in its own task."""
        req = GenerateRequest.model_validate_json(msg.data)
        self.requests.append(req)
        self.spawn(self._turn(req, msg.reply), f"turn:{req.session}")

    async def _turn(self, req: GenerateRequest, reply: str) -> None:
        if req.session in self.running:
            self.overlaps += 1
        run = self.running[req.session] = _Running(req.turn_id)
        queue = self.scripts.get(req.session) or self.any_scripts
        script = queue.popleft() if queue else Script()
        start = time.perf_counter()
        try:
            result = await self._play(req, script, run, start)
        finally:
            self.running.pop(req.session, None)
        if not script.lose_reply:
            await self.nc.publish(reply, encode(result))

    async def on_turn_status(self, msg: Msg) -> None:
        """``running`` while the named turn runs, as the real engine answers."""
        req = TurnStatusRequest.model_validate_json(msg.data)
        run = self.running.get(req.session)
        running = run is not None and run.turn_id == req.turn_id
        await self.respond(msg, TurnStatusReply(running=running))

    async def _play(
        self, req: GenerateRequest, script: Script, run: _Running, start: float
    ) -> GenerateResult:
        if script.error == ErrorCode.CONTEXT_OVERFLOW:
            return _error(req, script.error, f"the prompt is {N_CTX + 1} tokens but the context "
                          f"holds {N_CTX}", {"prompt_tokens": N_CTX + 1, "n_ctx": N_CTX})
        last = req.messages[-1].content or "" if req.messages else ""
        tokens = script.tokens if script.tokens is not None else ("re: ", last)
        sent: list[str] = []
        finish = script.finish_reason
        for i in range(len(tokens) + 1):  # the gate may also hold after the last piece
            if script.gate is not None and i == script.hold_after:
                if await self._held(script, run, req.turn_id):
                    finish = "aborted"
                    break
            elif run.cancelled.is_set() and not script.ignore_cancel:
                finish = "aborted"
                break
            if i == len(tokens):
                break
            await self.nc.publish(req.token_subject, encode(TokenEvent(
                session=req.session, turn_id=req.turn_id, index=i, text=tokens[i],
            )))
            sent.append(tokens[i])
        if script.error is not None:
            message = "the engine failed: scripted failure"
            return _error(req, script.error, message, {}, "".join(sent))
        text = "".join(sent)
        ms = (time.perf_counter() - start) * 1000
        return GenerateResult(
            session=req.session, turn_id=req.turn_id, text=text, raw_text=text,
            finish_reason=finish,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=len(req.messages), cached_tokens=0,
                        new_prefill_tokens=len(req.messages), completion_tokens=len(sent)),
            cache=CacheInfo(source="none", miss_reason="new_session"),
            timings=Timings(decode_ms=ms, total_ms=ms), model_id="fake",
            n_tokens=len(req.messages) + len(sent), token_hash=f"fake-{req.turn_id}",
        )

    async def _held(self, script: Script, run: _Running, turn_id: str) -> bool:
        """Wait at the gate; True when a cancel ended the turn there."""
        gate = script.gate
        assert gate is not None
        gate.turn_id = turn_id
        gate.reached.set()
        waits = [asyncio.ensure_future(gate.released.wait())]
        if not script.ignore_cancel:
            waits.append(asyncio.ensure_future(run.cancelled.wait()))
        _, rest = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in rest:
            w.cancel()
        return run.cancelled.is_set() and not script.ignore_cancel

    async def on_cancel(self, msg: Msg) -> None:
        """Stop the session's turn if it is the one named."""
        req = CancelRequest.model_validate_json(msg.data)
        self.cancels.append(req)
        self._cancelled[req.turn_id].set()
        run = self.running.get(req.session)
        hit = run is not None and run.turn_id == req.turn_id
        if hit and run is not None:
            run.cancelled.set()
        await self.respond(msg, CancelReply(cancelled=hit))

    async def on_snapshot(self, msg: Msg) -> None:
        """Pretend to bank the slot."""
        req = SnapshotRequest.model_validate_json(msg.data)
        self.snapshots.append(req)
        await self.respond(msg, SnapshotReply(stored=True, n_tokens=1, nbytes=1, ms=0.0))

    async def on_forget(self, msg: Msg) -> None:
        """Drop a deleted session's state."""
        req = ForgetRequest.model_validate_json(msg.data)
        self.forgets.append(req)
        await self.respond(msg, ForgetReply(session=req.session))

    async def on_adopt(self, msg: Msg) -> None:
        """Index moved sessions' durable snapshots: there is no durable tier, so none."""
        AdoptRequest.model_validate_json(msg.data)
        await self.respond(msg, AdoptReply(snapshots=0))

    async def on_bank_flush(self, msg: Msg) -> None:
        """Make handed-over sessions durable: as the real engine without a durable tier."""
        req = BankFlushRequest.model_validate_json(msg.data)
        missed = {s: "no durable bank tier" for s in req.commits}
        await self.respond(msg, BankFlushReply(stored=0, missed=missed))


def _error(
    req: GenerateRequest, code: ErrorCode, message: str, details: dict[str, Any], raw: str = ""
) -> GenerateResult:
    return GenerateResult(
        session=req.session, turn_id=req.turn_id, finish_reason="error", raw_text=raw,
        error=ErrorBody(code=code, message=message, details=details),
    )


class FakeNode:
    """The node's actors around a ``FakeEngine``, on an existing NATS server.

    Built by ``node.wiring`` from a ``NodeConfig`` (``settings`` are its fields), as
    ``node.app.Node`` builds them, so both run with the same limits.
    """

    def __init__(self, url: str, prefix: str = "infer", **settings: Any) -> None:
        self.url = url
        self.config = NodeConfig(nats_url=url, prefix=prefix, **settings)
        self.subjects = Subjects(prefix)
        self.engine = None
        """No real engine (the admin actor reads this for health)."""
        self.fake: FakeEngine
        self.host: RunnerHost
        self.admission: Admission
        self.actors: list[Actor] = []
        self._conns: list[Client] = []

    async def __aenter__(self) -> FakeNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _connect(self, name: str) -> Client:
        nc = await nats.connect(self.url, name=f"fake-node-{name}")
        self._conns.append(nc)
        return nc

    async def start(self) -> None:
        """Streams first, then engine, bank, runners, admission, admin (node.app's order)."""
        s, cfg = self.subjects, self.config
        admin_nc = await self._connect("admin")
        await prepare_streams(admin_nc, s, cfg)
        self.fake = FakeEngine(await self._connect("engine"), s)
        self.actors = await build_actors(
            cfg, s, self._connect, self.fake, admin_nc, self, "0.0.0", {"prefix": s.prefix},
            cfg.node_id or "fake-node",
        )
        self.host = next(a for a in self.actors if isinstance(a, RunnerHost))
        self.admission = next(a for a in self.actors if isinstance(a, Admission))
        for actor in self.actors:
            await actor.start()

    async def stop(self) -> None:
        """Stop actors in reverse order, then close the connections."""
        for actor in reversed(self.actors):
            await actor.stop()
        self.actors = []
        for nc in self._conns:
            if not nc.is_closed:
                with contextlib.suppress(Exception):
                    await nc.drain()
        self._conns = []
