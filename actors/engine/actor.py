"""The engine actor: turns, cancels and snapshots requested over NATS.

Token events go straight from here to the session's public ``token`` subject, in order,
through one publisher task per turn (with a long prefill's ``prompt_progress`` before them);
the result goes to the runner's reply inbox only after the last token was published, so a
subscriber sees every token before ``done``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from actors.base import Actor, encode
from actors.engine.bank.durable import DirectoryBackend, DurableBackend, DurableTier
from actors.engine.bank.objects import ObjectStoreBackend, open_object_store
from actors.engine.engine import SlotEngine
from actors.engine.interface import CancelToken, PrefillProgress, TurnSpec
from actors.engine.service import subscribe_engine
from schemas.errors import ErrorCode, InferError
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
from schemas.messages import PromptProgressEvent, TokenEvent, ToolCallEvent
from schemas.subjects import EventKind, Subjects
from schemas.tools import ToolCallDelta

_DONE = object()


class EngineActor(Actor):
    """Serves every subject in ``actors/engine/service.py``'s table for one engine."""

    name = "engine"

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        engine: SlotEngine,
        bank_dir: Path | None,
        bank_object_store: bool,
        bank_durable_bytes: int,
        replicas: int,
    ) -> None:
        super().__init__(nc, subjects)
        self.engine = engine
        self.bank_dir = bank_dir
        self.bank_object_store = bank_object_store
        self.bank_durable_bytes = bank_durable_bytes
        self.replicas = replicas
        """Copies of the bank's object store on the servers of a NATS cluster."""
        self.durable: DurableTier | None = None

    async def start(self) -> None:
        """Open the bank's durable tier (rebuilding its index), then subscribe."""
        await self._open_durable()
        await subscribe_engine(self)

    async def stop(self) -> None:
        """Drain, then finish queued durable writes and close the tier."""
        await super().stop()
        if self.durable is not None:
            if self.engine.bank is not None:
                self.engine.bank.attach(None)
            await asyncio.to_thread(self.durable.close)
            self.durable = None

    async def _open_durable(self) -> None:
        bank = self.engine.bank
        if not (self.bank_dir or self.bank_object_store):
            return
        if bank is None:
            self.log.warning("bank_durable_skipped", reason="snapshots are off")
            return
        backends: list[DurableBackend] = []
        if self.bank_dir is not None:
            backends.append(DirectoryBackend(self.bank_dir))
        if self.bank_object_store:
            js = self.nc.jetstream()
            store = await open_object_store(js, self.subjects.bank_bucket, self.replicas)
            backends.append(
                ObjectStoreBackend(store, asyncio.get_running_loop(), js, self.subjects)
            )
        tier = DurableTier(backends, self.bank_durable_bytes, bank.groups)
        try:
            await asyncio.to_thread(tier.open)
        except BaseException:
            await asyncio.to_thread(tier.close)
            raise
        self.durable = tier
        bank.attach(tier)

    async def on_generate(self, msg: Msg) -> None:
        """Run a turn in its own task: turns of different sessions overlap across slots."""
        req = GenerateRequest.model_validate_json(msg.data)
        self.spawn(self._generate(req, msg.reply), f"turn:{req.session}")

    async def _generate(self, req: GenerateRequest, reply: str) -> None:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[object] = asyncio.Queue()
        publisher = loop.create_task(self._publish_tokens(req, pieces))
        cancel = CancelToken()
        tokens = (
            {int(k): tuple(v) for k, v in req.assistant_tokens.items()}
            if req.model_id == self.engine.info.model_id
            else {}
        )
        spec = TurnSpec(
            session=req.session,
            turn_id=req.turn_id,
            messages=req.messages,
            params=req.params,
            assistant_tokens=tokens,
            generation=req.generation,
            queue_ms=req.queue_ms,
            tools=req.tools,
            window_start=req.window_start,
            omitted=req.omitted,
            omitted_turns=req.omitted_turns,
        )
        streamed: list[str] = []  # what the session has seen, kept for a failed turn's record

        def emit(text: str) -> None:  # called on the slot's thread
            streamed.append(text)
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        def emit_call(delta: ToolCallDelta) -> None:  # same queue: order with the text kept
            loop.call_soon_threadsafe(pieces.put_nowait, delta)

        def progress(step: PrefillProgress) -> None:  # a long prefill's, every few seconds
            loop.call_soon_threadsafe(pieces.put_nowait, step)

        try:
            out = await self.engine.run_turn(spec, emit, cancel, emit_call, progress)
            result = GenerateResult(
                session=req.session,
                turn_id=req.turn_id,
                text=out.text,
                raw_text=out.raw_text,
                tool_calls=out.tool_calls,
                finish_reason=out.finish_reason,  # type: ignore[arg-type]
                usage=out.usage,
                cache=out.cache,
                timings=out.timings,
                completion_ids=out.completion_ids,
                model_id=self.engine.info.model_id,
                n_tokens=out.n_tokens,
                token_hash=out.token_hash,
                window_start=out.window_start,
                stop_sequence=out.stop_sequence,
            )
        except InferError as e:
            result = self._failed(req, e.code, e.message, e.details, "".join(streamed))
        except Exception as e:
            self.errors += 1
            self.log.exception("turn_failed", session=req.session, error=str(e))
            result = self._failed(
                req, ErrorCode.INTERNAL, f"the engine failed: {e}", {}, "".join(streamed)
            )
        finally:
            pieces.put_nowait(_DONE)
            await publisher
        await self.nc.publish(reply, encode(result))

    def _failed(
        self, req: GenerateRequest, code: ErrorCode, message: str, details: dict,
        streamed: str = "",
    ) -> GenerateResult:
        return GenerateResult(
            session=req.session,
            turn_id=req.turn_id,
            text=streamed,
            raw_text=streamed,
            finish_reason="error",
            error=ErrorBody(code=code, message=message, details=details),
        )

    async def _publish_tokens(self, req: GenerateRequest, pieces: asyncio.Queue[object]) -> None:
        index = 0
        calls_subject = self.subjects.events(req.session, EventKind.TOOL_CALL)
        while True:
            item = await pieces.get()
            if item is _DONE:
                return
            if isinstance(item, PrefillProgress):
                await self._publish_progress(req, item)
                continue
            if isinstance(item, ToolCallDelta):
                call = ToolCallEvent(session=req.session, turn_id=req.turn_id, tool_calls=(item,))
                await self.nc.publish(calls_subject, encode(call))
                continue
            event = TokenEvent(
                session=req.session, turn_id=req.turn_id, index=index, text=str(item)
            )
            await self.nc.publish(req.token_subject, encode(event))
            index += 1

    async def _publish_progress(self, req: GenerateRequest, step: PrefillProgress) -> None:
        event = PromptProgressEvent(
            session=req.session, turn_id=req.turn_id, done=step.done, total=step.total,
            cached=step.cached, elapsed_ms=step.elapsed_ms,
        )
        subject = self.subjects.events(req.session, EventKind.PROMPT_PROGRESS)
        await self.nc.publish(subject, encode(event))

    async def on_cancel(self, msg: Msg) -> None:
        """Stop the session's turn if it is the one named."""
        req = CancelRequest.model_validate_json(msg.data)
        hit = self.engine.cancel(req.session, req.turn_id)
        await self.respond(msg, CancelReply(cancelled=hit))

    async def on_turn_status(self, msg: Msg) -> None:
        """Answer whether the named turn still runs here (a runner checks on a late result)."""
        req = TurnStatusRequest.model_validate_json(msg.data)
        running = self.engine.runs(req.session, req.turn_id)
        await self.respond(msg, TurnStatusReply(running=running))

    async def on_snapshot(self, msg: Msg) -> None:
        """Bank a session's slot in its own task: one waiting for a busy slot holds no other."""
        req = SnapshotRequest.model_validate_json(msg.data)
        self.spawn(self._snapshot(req, msg), f"snapshot:{req.session}")

    async def _snapshot(self, req: SnapshotRequest, msg: Msg) -> None:
        out = await self.engine.snapshot(req.session, req.token_hash, req.wait_s)
        await self.respond(
            msg,
            SnapshotReply(
                stored=out.stored, n_tokens=out.n_tokens, nbytes=out.nbytes, ms=out.ms,
                reason=out.reason,
            ),
        )

    async def on_adopt(self, msg: Msg) -> None:
        """Index the durable snapshots of sessions that moved here (restore, not recompute)."""
        req = AdoptRequest.model_validate_json(msg.data)
        known = 0
        if self.durable is not None:
            known = await asyncio.to_thread(self.durable.open, frozenset(req.sessions))
        await self.respond(msg, AdoptReply(snapshots=known))

    async def on_bank_flush(self, msg: Msg) -> None:
        """Make sessions handed to another node durable, in a task (slots may be busy)."""
        req = BankFlushRequest.model_validate_json(msg.data)
        self.spawn(self._bank_flush(req, msg), "bank_flush")

    async def _bank_flush(self, req: BankFlushRequest, msg: Msg) -> None:
        sessions = list(req.commits)
        # A commit's snapshot already stored is found again and only queued durably.
        outs = await asyncio.gather(*(
            self.engine.snapshot(s, req.commits[s], req.wait_s) for s in sessions
        ))
        missed = {
            s: o.reason or "not stored" for s, o in zip(sessions, outs, strict=True)
            if not o.stored
        }
        if self.durable is None:
            missed = {s: "no durable bank tier" for s in sessions}
        else:
            await asyncio.wrap_future(self.durable.flush())
        await self.respond(msg, BankFlushReply(stored=len(sessions) - len(missed), missed=missed))

    async def on_forget(self, msg: Msg) -> None:
        """Drop a deleted session's state."""
        req = ForgetRequest.model_validate_json(msg.data)
        await self.engine.forget(req.session)
        await self.respond(msg, ForgetReply(session=req.session))
