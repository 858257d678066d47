"""SlotEngine: slots, prefix reuse, banking and turns over any ``Backend``.

The event loop only assigns slots and awaits futures; everything that touches the model
runs on the slot's worker thread.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import structlog

from actors.bank_store import BankEntry, BankStore, token_hash
from actors.engine.interface import (
    Backend,
    CancelToken,
    EngineInfo,
    SnapshotOutcome,
    TurnOutcome,
    TurnSpec,
)
from actors.engine.slots import Slot, SlotPool
from actors.engine.templates import ChatTemplate, parse_tool_calls
from actors.engine.tokenizer import ASSISTANT_MARK
from actors.engine.turn import decode, prefill
from schemas.chat import CacheInfo, ChatMessage, Timings, Usage
from schemas.errors import ErrorCode, InferError

log = structlog.get_logger("engine")


class SlotEngine:
    """N slots over one backend; a session keeps its slot while resident."""

    def __init__(
        self,
        backend: Backend,
        template: ChatTemplate,
        template_name: str,
        n_slots: int,
        bank: BankStore | None,
        snapshot_note: str = "",
    ) -> None:
        self.backend = backend
        self.template = template
        self.bank = bank
        self.pool = SlotPool([Slot(i, backend.new_context()) for i in range(n_slots)])
        self._evicted: set[str] = set()
        self._running: dict[str, CancelToken] = {}
        self.info = EngineInfo(
            engine=backend.name,
            model=backend.description,
            model_id=backend.model_id,
            n_ctx=backend.n_ctx,
            n_vocab=backend.n_vocab,
            n_slots=n_slots,
            snapshots=bank is not None,
            snapshot_note=snapshot_note,
            template=template_name,
        )

    # -- turns ----------------------------------------------------------------------------
    async def run_turn(
        self, spec: TurnSpec, emit: Callable[[str], None], cancel: CancelToken
    ) -> TurnOutcome:
        """Run one turn of ``spec.session``; ``emit`` is called from the worker thread."""
        waited = time.perf_counter()
        slot = await self.pool.acquire(spec.session)
        lock_wait_ms = (time.perf_counter() - waited) * 1000
        self._running[spec.session] = cancel
        try:
            job = slot.worker.submit(lambda: self._turn(slot, spec, emit, cancel, lock_wait_ms))
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                cancel.cancel("shutdown")
                await asyncio.wait([job])
                raise
        finally:
            self._running.pop(spec.session, None)
            await self.pool.release(slot)

    def cancel(self, session: str, reason: str = "client") -> bool:
        """Stop the running turn of ``session``; False if none runs."""
        token = self._running.get(session)
        if token is None:
            return False
        token.cancel(reason)
        return True

    def _turn(
        self,
        slot: Slot,
        spec: TurnSpec,
        emit: Callable[[str], None],
        cancel: CancelToken,
        lock_wait_ms: float,
    ) -> TurnOutcome:
        t0 = time.perf_counter()
        tokens = self.prompt_tokens(spec)
        tokenize_ms = (time.perf_counter() - t0) * 1000
        if len(tokens) >= self.backend.n_ctx:
            raise InferError(
                ErrorCode.CONTEXT_OVERFLOW,
                f"the prompt is {len(tokens)} tokens but the context holds "
                f"{self.backend.n_ctx}; shorten the history or start the node with a larger "
                "--ctx",
                {"prompt_tokens": len(tokens), "n_ctx": self.backend.n_ctx},
            )
        source, miss, restore_ms = self._prepare(slot, spec.session, tokens)
        had = len(slot.tokens)
        reused, prefill_ms = prefill(slot, tokens)
        if source == "slot" and reused < had and miss is None:
            miss = f"prefix_divergence_at_token {reused}"
        if reused == 0:
            source = "none"
        out = decode(
            self.backend, slot, spec.sampling, spec.stop, spec.max_tokens, emit, cancel
        )
        end = time.perf_counter()
        text, calls = out.raw_text, ()
        if "<tool_call>" in out.raw_text:
            text, calls = parse_tool_calls(out.raw_text, lambda: f"call_{uuid.uuid4().hex[:12]}")
        finish = "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason
        ttft = ((out.first_token_at or end) - t0) * 1000
        return TurnOutcome(
            raw_text=out.raw_text,
            text=text,
            tool_calls=tuple(calls),
            finish_reason=finish,
            completion_ids=out.completion_ids,
            usage=Usage(
                prompt_tokens=len(tokens),
                cached_tokens=reused,
                new_prefill_tokens=len(tokens) - reused,
                completion_tokens=out.completion_tokens,
            ),
            cache=CacheInfo(source=source, miss_reason=miss, restore_ms=restore_ms),
            timings=Timings(
                queue_ms=spec.queue_ms,
                lock_wait_ms=lock_wait_ms,
                tokenize_ms=tokenize_ms,
                restore_ms=restore_ms,
                prefill_ms=prefill_ms,
                decode_ms=out.decode_ms,
                ttft_ms=ttft,
                total_ms=(end - t0) * 1000,
            ),
            n_tokens=len(slot.tokens),
            token_hash=token_hash(slot.tokens),
        )

    def prompt_tokens(self, spec: TurnSpec) -> list[int]:
        """Render the conversation and tokenise it, splicing known assistant token ids."""
        messages: list[ChatMessage] = []
        spliced: dict[int, tuple[int, ...]] = {}
        for i, m in enumerate(spec.messages):
            ids = spec.assistant_tokens.get(i)
            if m.role == "assistant" and ids is not None:
                messages.append(ChatMessage(role="assistant", content=ASSISTANT_MARK.format(i)))
                spliced[i] = ids
            else:
                messages.append(m)
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except ValueError as e:
            raise InferError(ErrorCode.BAD_REQUEST, f"the chat template failed: {e}") from e
        bos = self.backend.bos_text
        add_bos = not (bos and text.startswith(bos))
        return self.backend.tokenizer.encode(text, add_bos, spliced)

    def _prepare(self, slot: Slot, session: str, tokens: list[int]) -> tuple[str, str | None, float]:
        """Make ``slot`` hold the best state for ``session``: (source, miss reason, ms)."""
        if slot.session == session:
            return "slot", None, 0.0
        if slot.session is not None:
            self._evict(slot)
        slot.session, slot.tokens = session, []
        if self.bank is None:
            return "none", "evicted" if session in self._evicted else "new_session", 0.0
        match = self.bank.best_match(session, tokens, self.backend.model_id)
        if match.entry is None:
            reason = "evicted" if session in self._evicted else match.miss_reason
            return "none", reason, 0.0
        start = time.perf_counter()
        slot.ctx.set_state(match.entry.data)
        slot.tokens = list(match.entry.tokens)
        return "bank", match.miss_reason, (time.perf_counter() - start) * 1000

    def _evict(self, slot: Slot) -> None:
        old = slot.session
        assert old is not None
        self._evicted.add(old)
        if self.bank is not None and slot.tokens:
            self._bank_slot(slot)
        log.info("slot_evicted", slot=slot.index, session=old, tokens=len(slot.tokens))
        slot.session, slot.tokens = None, []

    def _bank_slot(self, slot: Slot) -> SnapshotOutcome:
        assert self.bank is not None and slot.session is not None
        digest = token_hash(slot.tokens)
        if self.bank.has(slot.session, digest):
            return SnapshotOutcome(True, len(slot.tokens), 0, 0.0, "already_banked")
        start = time.perf_counter()
        data = slot.ctx.state_bytes()
        ms = (time.perf_counter() - start) * 1000
        entry = BankEntry(
            session=slot.session,
            tokens=tuple(slot.tokens),
            data=data,
            model_id=self.backend.model_id,
            token_hash=digest,
        )
        if not self.bank.put(entry):
            return SnapshotOutcome(False, len(slot.tokens), len(data), ms, "too_large_for_bank")
        return SnapshotOutcome(True, len(slot.tokens), len(data), ms)

    # -- bank -----------------------------------------------------------------------------
    async def snapshot(self, session: str, digest: str, wait_s: float) -> SnapshotOutcome:
        """Bank the slot of ``session`` if it still holds the state ``digest``."""
        if self.bank is None:
            return SnapshotOutcome(False, reason="snapshots_disabled")
        slot = self.pool.resident(session)
        if slot is None:
            return SnapshotOutcome(False, reason="not_resident")
        expired = False

        def job() -> SnapshotOutcome:
            if expired:
                return SnapshotOutcome(False, reason="deadline")
            if slot.session != session or token_hash(slot.tokens) != digest:
                return SnapshotOutcome(False, reason="superseded")
            return self._bank_slot(slot)

        fut = slot.worker.submit(job)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), wait_s)
        except TimeoutError:
            expired = True
            return SnapshotOutcome(False, reason="deadline")

    async def forget(self, session: str) -> None:
        """Drop the slot state and bank entries of a deleted session."""
        slot = self.pool.resident(session)
        if slot is not None and not slot.busy:
            slot.session, slot.tokens = None, []
        self._evicted.discard(session)
        if self.bank is not None:
            self.bank.forget(session)

    def stats(self) -> dict[str, object]:
        """Slots and bank, for admin and metrics."""
        return {
            "slots": [
                {"index": s.index, "session": s.session, "tokens": len(s.tokens), "busy": s.busy}
                for s in self.pool.slots
            ],
            "bank": self.bank.stats() if self.bank else None,
        }

    async def close(self) -> None:
        """Stop every worker thread, then free the model."""
        for token in self._running.values():
            token.cancel("shutdown")
        await asyncio.to_thread(self.pool.close)
        self.backend.close()
