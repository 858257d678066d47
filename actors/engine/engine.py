"""SlotEngine: slots, prefix reuse, banking and turns over any ``Backend``.

The event loop only assigns slots and awaits futures; everything that touches the model
runs on the slot's worker thread.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Literal

import structlog

from actors.engine.bank.meta import Compat
from actors.engine.bank.store import BankStore
from actors.engine.banking import SlotBank
from actors.engine.decode import (
    ChunkSize,
    DecodeResult,
    Prefilled,
    ProgressClock,
    decode,
    prefill,
)
from actors.engine.grammar import Grammars
from actors.engine.interface import (
    Backend,
    CancelToken,
    EngineInfo,
    PrefillProgress,
    SnapshotOutcome,
    TurnOutcome,
    TurnSpec,
)
from actors.engine.prompt import PromptBuilder
from actors.engine.slots import Slot, SlotPool
from actors.engine.speculation import MAX_DRAFT, DraftPolicy, can_verify
from actors.engine.stats import EngineStats
from actors.engine.templates.chat import ChatTemplate
from actors.engine.templates.tool_stream import FirstCallEnds, ToolCallStream, reply_calls
from actors.engine.tokens import token_hash
from actors.engine.window import shift_kept
from schemas.chat import CacheInfo, ChatMessage, OverflowPolicy, Timings, ToolCall, Usage
from schemas.tools import Tool, ToolCallDelta

log = structlog.get_logger("engine")

CacheSource = Literal["slot", "bank", "none"]
NO_CALLS: tuple[ToolCall, ...] = ()
Progress = Callable[[PrefillProgress], None]


def new_call_id() -> str:
    """A tool call id."""
    return f"call_{uuid.uuid4().hex[:12]}"


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
        overflow: OverflowPolicy = "truncate",
        stops: tuple[str, ...] = (),
        speculate: str = "off",
        n_batch: int = 512,
    ) -> None:
        self.backend = backend
        self.template = template
        self.prompts = PromptBuilder(backend, template, overflow)
        self.stops = stops
        """Stop strings of every turn: the template's end marker where it is no end token."""
        self.bank = bank
        self.n_batch = n_batch
        """Prompt tokens per prefill chunk while no other slot is busy."""
        self.pool = SlotPool([Slot(i, backend.new_context()) for i in range(n_slots)])
        self.draft = MAX_DRAFT if speculate == "on" and can_verify(self.pool.slots[0].ctx) else 0
        """Most proposed tokens verified per evaluation (0: no speculative decoding)."""
        self.speculation = DraftPolicy(self.draft) if self.draft else None
        share_cores = getattr(backend, "share_cores", None)
        if share_cores is not None:  # backends whose slots evaluate on their own threads
            share_cores(self.pool.busy_count)
        self._running: dict[str, tuple[str, CancelToken]] = {}
        """The turn each session runs (or waits for a slot to run): turn id and its cancel."""
        self.compat = Compat(backend.model_id, backend.n_ctx, template_name)
        self.grammars = Grammars(backend)
        self.turn_stats = EngineStats()
        self.banking = SlotBank(bank, self.pool, self.compat, self.turn_stats, self._running)
        """Slot states in and out of the bank (commits, evictions, durable fetches)."""
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
        self,
        spec: TurnSpec,
        emit: Callable[[str], None],
        cancel: CancelToken,
        emit_call: Callable[[ToolCallDelta], None] | None = None,
        progress: Progress | None = None,
    ) -> TurnOutcome:
        """Run one turn of ``spec.session``; ``emit``, ``emit_call`` (tool-call deltas) and
        ``progress`` (a long prefill's, every few seconds) are called from the worker
        thread."""
        # Registered before the slot is ours, so a cancel while waiting for it counts too.
        running = self._running[spec.session] = (spec.turn_id, cancel)
        try:
            await self.banking.fetch_durable(spec.session)
            if spec.generation == 0:
                await self.banking.bank_idle_slots(spec.session)
            waited = time.perf_counter()
            slot = await self.pool.acquire(spec.session)
        except BaseException:
            self._done(spec.session, running)
            raise
        lock_wait_ms = (time.perf_counter() - waited) * 1000
        try:
            job = slot.worker.submit(
                lambda: self._turn(slot, spec, emit, cancel, lock_wait_ms, emit_call, progress)
            )
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                cancel.cancel("shutdown")
                await asyncio.wait([job])
                raise
        finally:
            self._done(spec.session, running)
            await self.pool.release(slot)

    def _done(self, session: str, running: tuple[str, CancelToken]) -> None:
        if self._running.get(session) is running:
            del self._running[session]

    def runs(self, session: str, turn_id: str) -> bool:
        """True while the turn ``turn_id`` of ``session`` runs here (or waits for a slot)."""
        running = self._running.get(session)
        return running is not None and running[0] == turn_id

    def cancel(self, session: str, turn_id: str | None = None, reason: str = "client") -> bool:
        """Stop the running turn of ``session`` (only if it is ``turn_id``); False if none."""
        running = self._running.get(session)
        if running is None or (turn_id is not None and running[0] != turn_id):
            return False
        running[1].cancel(reason)
        return True

    def _turn(
        self,
        slot: Slot,
        spec: TurnSpec,
        emit: Callable[[str], None],
        cancel: CancelToken,
        lock_wait_ms: float,
        emit_call: Callable[[ToolCallDelta], None] | None = None,
        progress: Progress | None = None,
    ) -> TurnOutcome:
        t0 = time.perf_counter()
        tokens, window = self.prompts.window_tokens(spec)
        constraint = self.grammars.constraint(spec)
        tokenize_ms = (time.perf_counter() - t0) * 1000
        # A session with committed turns lost its state if none is found; a new one had none,
        # whatever its first prompt holds (a client may send a whole earlier conversation).
        resumed = spec.generation > 0
        source, miss, restore_ms, tier, shared = self._prepare(
            slot, spec.session, tokens, resumed
        )
        slot.digest = None  # the tokens change from here on
        if self.prompts.policy(spec) == "shift":
            shift_kept(slot, tokens)
        had = len(slot.tokens)
        filled = self._prefill(slot, tokens, cancel, progress)
        reused, prefill_ms = filled.reused, filled.ms
        if source == "slot" and reused < had and miss is None:
            miss = f"prefix_divergence_at_token {reused}"
        if reused == 0:
            source, tier, shared = "none", "", False
        parses_calls = spec.params.tool_choice != "none"
        calls_stream = ToolCallStream(new_call_id)
        one_call = parses_calls and spec.params.parallel_tool_calls is False
        ends = FirstCallEnds(cancel, calls_stream) if one_call else cancel

        def emit_text(text: str) -> None:
            emit(text)
            if parses_calls:
                for delta in calls_stream.feed(text):
                    if emit_call is not None:
                        emit_call(delta)

        reply = spec.params
        out = decode(
            self.backend, slot, reply.sampling, (*reply.stop, *self.stops), reply.max_tokens,
            emit_text, ends, constraint, self.speculation,
        ) if filled.complete else ABORTED_IN_PREFILL
        end = time.perf_counter()
        slot.digest = token_hash(slot.tokens)  # the one hash of this state: passed along
        text, calls, finish = out.raw_text, NO_CALLS, out.finish_reason
        if parses_calls:
            text, calls, finish = reply_calls(out.raw_text, finish, calls_stream, ends)
        ttft = ((out.first_token_at or end) - t0) * 1000
        outcome = TurnOutcome(
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
                dropped_tokens=window.dropped_tokens,
                dropped_turns=window.dropped_turns,
            ),
            cache=_cache_info(source, miss, restore_ms, tokens[:reused] if shared else None, tier),
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
            token_hash=slot.digest,
            window_start=window.start,
            # The template's own end markers are stops too; only the prompt's are reported.
            stop_sequence=out.stop_sequence if out.stop_sequence in spec.params.stop else None,
        )
        self.turn_stats.record(
            spec.session, outcome.usage, outcome.cache, outcome.timings, tier
        )
        self.turn_stats.speculated(out.proposed_tokens, out.accepted_tokens)
        return outcome

    def _prefill(
        self, slot: Slot, tokens: list[int], cancel: CancelToken, progress: Progress | None
    ) -> Prefilled:
        """Prefill in chunks: ``n_batch`` tokens at a time alone, smaller ones while another
        slot is busy (``ChunkSize``). Their next tokens wait for each chunk (on llama-cpp they
        ride in its batch), so a long prompt delays them by one short step at a time."""
        chunk = ChunkSize(self.n_batch, lambda: self.pool.busy_count() > 1)
        report = ProgressClock(progress, len(tokens)) if progress else None
        return prefill(slot, tokens, cancel, chunk, report)

    def prompt_tokens(self, spec: TurnSpec) -> list[int]:
        """Render the whole conversation and tokenise it, splicing known assistant token ids."""
        return self.prompts.prompt_tokens(spec)

    def count_tokens(self, messages: Sequence[ChatMessage], tools: Sequence[Tool]) -> int:
        """Tokens of the prompt a first turn over ``messages`` would render (nothing spliced,
        the whole conversation): what a stateless client's turn is charged as input."""
        return len(self.prompts.encode(messages, {}, tools))

    def _prepare(
        self, slot: Slot, session: str, tokens: list[int], resumed: bool
    ) -> tuple[CacheSource, str | None, float, str, bool]:
        """Make ``slot`` hold the best state for ``session``: (source, miss, ms, tier, shared).

        ``shared``: the state was banked by another session whose tokens begin like this
        prompt; the turn's prefill keeps only the common prefix of it.
        """
        if slot.session == session:
            return "slot", None, 0.0, "slot", False
        if slot.session is not None:
            self.banking.evict(slot)
        slot.session, slot.tokens, slot.digest = session, [], None
        lost = "evicted" if self.banking.was_evicted(session) or resumed else "new_session"
        if self.bank is None:
            return "none", lost, 0.0, "", False
        start = time.perf_counter()  # restore time includes reading a durable snapshot
        match = self.bank.best_match(session, tokens, self.compat)
        if match.entry is None:
            reason = lost if match.miss_reason == "new_session" else match.miss_reason
            return "none", reason, 0.0, "", False
        try:
            slot.ctx.set_state(match.entry.data)
        except Exception as e:  # a state this context cannot take is never a failed turn
            log.warning("bank_restore_failed", session=session, error=str(e))
            self.bank.forget(match.entry.meta.session)
            slot.tokens = []
            return "none", "model_mismatch", 0.0, "", False
        slot.tokens, slot.digest = list(match.entry.meta.tokens), match.entry.meta.token_hash
        if match.shared:
            # Past the common prefix the cells are another conversation's: the slot claims only
            # the shared part, so nothing later (a window shift included) can reuse the rest.
            slot.tokens, slot.digest = slot.tokens[: match.reused], None
        ms = (time.perf_counter() - start) * 1000 + match.fetch_ms
        return "bank", match.miss_reason, ms, match.tier, match.shared

    async def snapshot(self, session: str, digest: str, wait_s: float) -> SnapshotOutcome:
        """Bank the exact state ``digest`` of ``session`` once its slot is idle (bounded)."""
        return await self.banking.snapshot(session, digest, wait_s)

    async def forget(self, session: str) -> None:
        """Drop the slot state and every bank entry (RAM and durable) of a deleted session."""
        slot = self.pool.resident(session)
        if slot is not None:

            def clear() -> None:
                if slot.session == session:
                    slot.session, slot.tokens, slot.digest = None, [], None

            await slot.worker.submit(clear)
        self.banking.forget(session)
        self.prompts.forget(session)
        self.turn_stats.forget(session)
        if self.bank is not None:
            self.bank.forget(session)
            if self.bank.durable is not None:
                await asyncio.wrap_future(self.bank.durable.forget(session))

    def stats(self) -> dict[str, object]:
        """Slots, bank and turn counters, for admin and metrics."""
        return {
            "slots": [
                {"index": s.index, "session": s.session, "tokens": len(s.tokens), "busy": s.busy}
                for s in self.pool.slots
            ],
            "bank": self.bank.stats() if self.bank else None,
            "turns": self.turn_stats.counters(),
        }

    async def close(self) -> None:
        """Stop every worker thread, then free the model."""
        for _, token in self._running.values():
            token.cancel("shutdown")
        await asyncio.to_thread(self.pool.close)
        self.backend.close()


ABORTED_IN_PREFILL = DecodeResult(
    raw_text="", finish_reason="aborted", completion_ids=(), completion_tokens=0,
    prefill_ms=0.0, decode_ms=0.0, first_token_at=None,
)
"""The reply of a turn cancelled before its prompt was evaluated: none."""


def _cache_info(
    source: CacheSource, miss: str | None, ms: float, shared: Sequence[int] | None, tier: str
) -> CacheInfo:
    """The turn's cache telemetry; ``shared`` is the prefix restored from another session's
    snapshot, named by its content hash and the tier it came from, never by the other
    session: one agent must not learn another's session id from its own ``done`` event."""
    if shared is None:
        return CacheInfo(source=source, miss_reason=miss, restore_ms=ms)
    return CacheInfo(
        source=source, miss_reason=miss, restore_ms=ms, shared_from=tier,  # type: ignore[arg-type]
        shared_tokens=len(shared), shared_prefix=token_hash(shared),
    )

