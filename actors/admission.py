"""Admission: takes prompts from the durable intake stream, validates, hands them to runners.

Each partition of the sessions has its own consumer on the intake stream, pulled only by the
partition's owner (``actors.ownership``): a node pulls the prompts of the partitions whose
leases it holds, and stops pulling a partition the moment it loses the lease (or, when it
hands the partition to a node that joined, once the prompts in hand are recorded). A prompt
is acked on the intake stream only once its session runner answered that it is in the record
log (or refused it for good, with a typed error event). Until then it stays in the stream
and is redelivered — after a crash, or when the record log or the runner is
unavailable (``unavailable`` is "not now", never a refusal); the runner recognises a
redelivery by its intake sequence and does not record it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from actors.base import (
    Actor,
    encode,
    error_event,
    error_headers,
    parse_reply,
    validation_sentence,
    wait_any,
)
from actors.intake_marks import IntakeMarks
from actors.ownership import Ownership
from actors.schema_worker import SchemaWorker
from actors.seal import is_sealed
from schemas.errors import ErrorCode, InferError
from schemas.internal import AdmitReply, AdmitRequest
from schemas.json_depth import check_json_depth
from schemas.messages import PromptRequest
from schemas.records import CRASH_LIMIT
from schemas.subjects import ANSWER_TO_HEADER, MSG_ID_HEADER, EventKind, Subjects, is_session_id

TRANSIENT = frozenset({ErrorCode.UNAVAILABLE})
"""Refusals that say "not now" (the record log or the node is unavailable): offered again."""
ADMIT_TIMEOUT_S = 10.0
"""Longest wait for a runner to record a prompt before it is offered again."""
FETCH_BATCH = 32
"""Prompts pulled from the intake stream at once."""
RETRY_S = 1.0
"""Delay before a prompt that could not be recorded now is offered again."""
SUBSCRIBE_RETRY_S = 0.25
SUBSCRIBE_RETRY_MAX_S = 4.0
"""A partition's consumer that cannot be taken over is tried again after 0.25 s, doubling
up to 4 s, until it can (or the partition is lost)."""
ACK_WAIT_S = 30.0
"""How long a pulled prompt may stay unacked before JetStream offers it again."""
MAX_ACK_PENDING = 1024
"""Prompts of one partition pulled and not yet acked."""
NAK_TRIES = int(ACK_WAIT_S / RETRY_S) - 2
"""Times a deferral is sent, RETRY_S apart, until a server confirms it. A deferral sent while
the consumer's leader is being elected (its server lost) reaches no one, and the prompt
would wait out ACK_WAIT_S; so it is sent until shortly before that wait would offer it again
anyway (an election among several streams on a loaded machine can take over 10 s)."""


class Admission(Actor):
    """Pulls each owned partition's prompts from the intake stream, one prompt at a time per
    session."""

    name = "admission"

    def __init__(
        self,
        nc: Client,
        subjects: Subjects,
        max_prompt_bytes: int,
        ownership: Ownership,
        seal_secret: bytes,
    ) -> None:
        super().__init__(nc, subjects)
        self.js: JetStreamContext = nc.jetstream()
        self.max_prompt_bytes = max_prompt_bytes
        self.ownership = ownership
        self.seal_secret = seal_secret
        """Keys the ask door's seal: only a sealed ``Infer-Answer-To`` is answered."""
        self.own_inbox = nc.new_inbox().rpartition(".")[0]
        """The prefix of the node's reply inboxes, never an ask's."""
        self.schemas = SchemaWorker()
        """Compiles the prompts' schemas in its own process (a crash there is a refusal)."""
        self.marks = IntakeMarks(nc, subjects)
        """Counts the deliveries of each prompt that the node's death cut."""
        self._stopping = asyncio.Event()
        self._pullers: dict[int, asyncio.Task[None]] = {}
        self._halts: dict[int, asyncio.Event] = {}
        """Set to stop one partition's puller after the prompts in hand (a hand-over)."""
        self._invalid: asyncio.Task[None] | None = None
        self.admitted = 0
        self.rejected = 0
        self.deferred = 0
        self._deferred_now: set[int] = set()
        """Ids of the prompts in hand that were deferred."""

    async def start(self) -> None:
        """Start pulling the partitions this node owns (and later those it gains), and the
        prompts whose subject names no session (every node refuses those)."""
        await self.marks.open()
        self.ownership.join(self)
        await self.gain(self.ownership.held())
        self._invalid = asyncio.get_running_loop().create_task(
            self._pull(None, asyncio.Event()), name="admission:invalid"
        )

    async def gain(self, partitions: frozenset[int]) -> None:
        """Start a puller for each partition: it takes over the partition's consumer (until
        it can: a server may be electing the stream's leader) and pulls it."""
        for partition in sorted(partitions):
            if partition in self._pullers or self._stopping.is_set():
                continue
            halt = self._halts[partition] = asyncio.Event()
            self._pullers[partition] = asyncio.get_running_loop().create_task(
                self._pull(partition, halt), name=f"admission:{partition}"
            )

    async def lose(self, partitions: frozenset[int]) -> None:
        """Stop pulling at once; what was pulled and not acked goes to the new owner."""
        tasks = [self._pullers.pop(p) for p in partitions if p in self._pullers]
        for partition in partitions:
            self._halts.pop(partition, None)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def hand_over(self, partitions: frozenset[int]) -> None:
        """Stop pulling once the prompts in hand are recorded (or offered again): what is
        left in the intake goes to the node taking the partitions over."""
        held = [p for p in partitions if p in self._pullers]
        for partition in held:
            self._halts[partition].set()
        await asyncio.gather(*(self._pullers[p] for p in held), return_exceptions=True)
        for partition in held:
            self._pullers.pop(partition, None)
            self._halts.pop(partition, None)

    async def _subscribe_until_done(
        self, partition: int | None, halt: asyncio.Event
    ) -> JetStreamContext.PullSubscription | None:
        """The partition's pull subscription, tried again (0.25 s, doubling up to 4 s) while
        JetStream cannot answer; None once stopping or halted first."""
        delay = SUBSCRIBE_RETRY_S
        while not (self._stopping.is_set() or halt.is_set()):
            try:
                return await self._subscribe(partition)
            except Exception as e:
                self.log.warning("intake_subscribe_failed", partition=partition,
                                 error=repr(e), retry_in_s=delay)
            await wait_any(delay, self._stopping, halt)
            delay = min(2 * delay, SUBSCRIBE_RETRY_MAX_S)
        return None

    async def _subscribe(self, partition: int | None) -> JetStreamContext.PullSubscription:
        stream = self.subjects.prompt_stream
        durable = self.subjects.admission_consumer(partition)
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=ACK_WAIT_S, max_ack_pending=MAX_ACK_PENDING,
        )
        if partition is not None:
            await self._take_over(partition)
            return await self.js.pull_subscribe(
                self.subjects.intake(partition), durable=durable, stream=stream, config=config
            )
        # Created or updated: a consumer made by an older version filtered fewer subjects,
        # and what it missed would stay in the intake for good.
        config.durable_name = config.name = durable
        config.filter_subjects = list(self.subjects.prompt_unsessioned())
        await self.js.add_consumer(stream, config)
        return await self.js.pull_subscribe_bind(durable, stream)

    async def _take_over(self, partition: int) -> None:
        """Offer again, at once and in stream order, what a previous owner had pulled.

        Prompts delivered to a node that died (or lost the partition) before acking them
        would otherwise come back only after the consumer's ack wait, behind prompts
        published after them. Nothing is lost by recreating the consumer: a work-queue
        stream keeps every unacked prompt, the new consumer starts from the first, and the
        runners recognise what they had already recorded by its intake sequence.
        """
        stream, durable = self.subjects.prompt_stream, self.subjects.admission_consumer(partition)
        try:
            info = await self.js.consumer_info(stream, durable)
        except NotFoundError:  # pull_subscribe creates it
            return
        if info.num_ack_pending == 0:
            return
        self.log.info("intake_taken_over", partition=partition, unacked=info.num_ack_pending)
        await self.js.delete_consumer(stream, durable)
        await self.js.add_consumer(stream, info.config)

    async def stop(self) -> None:
        """Finish the prompts in hand, then stop pulling (the rest stays in the stream)."""
        self._stopping.set()
        pullers = [*self._pullers.values(), *([self._invalid] if self._invalid else [])]
        await asyncio.gather(*pullers, return_exceptions=True)
        self._pullers.clear()
        await self.schemas.close()
        await super().stop()

    async def _pull(self, partition: int | None, halt: asyncio.Event) -> None:
        sub = await self._subscribe_until_done(partition, halt)
        if sub is None:
            return
        try:
            while not (self._stopping.is_set() or halt.is_set()):
                try:
                    msgs = await sub.fetch(FETCH_BATCH, timeout=0.5)
                except (TimeoutError, NatsTimeoutError):
                    continue
                except Exception as e:  # a reconnect in progress: try again shortly
                    if self._stopping.is_set():
                        return
                    self.log.warning("intake_fetch_failed", partition=partition, error=str(e))
                    await wait_any(0.5, self._stopping, halt)
                    continue
                await self._admit_batch(msgs)
        finally:
            # A pull subscription never drains on its own (its fetch inbox stays open).
            try:
                await sub.unsubscribe()
            except Exception as e:  # the connection may already be gone
                self.log.debug("unsubscribe_failed", error=str(e))

    async def _admit_batch(self, msgs: list[Msg]) -> None:
        """Different sessions' prompts are admitted concurrently, each session's in order."""
        by_session: dict[str, list[Msg]] = {}
        for msg in msgs:
            by_session.setdefault(msg.subject, []).append(msg)
        try:
            await asyncio.gather(*(self._admit_in_order(g) for g in by_session.values()))
        finally:  # other partitions' batches share the set: drop only this batch's ids
            self._deferred_now.difference_update(id(msg) for msg in msgs)

    async def _admit_in_order(self, msgs: list[Msg]) -> None:
        for i, msg in enumerate(msgs):
            session = self.subjects.session_of_prompt(msg.subject)
            # Paused past the lease: the partition is not this node's now (a subject that
            # names no session is refused by any node).
            if is_session_id(session) and not self.ownership.valid(session):
                self.log.warning("admit_skipped_lease_lapsed", session=session)
                return
            await self._admit_marked(msg, session)
            if id(msg) in self._deferred_now:  # the session's later prompts wait behind this one
                for later in msgs[i + 1:]:
                    session = self.subjects.session_of_prompt(msg.subject)
                    await self._defer(later, session, "an earlier prompt was deferred")
                return

    async def _admit_marked(self, msg: Msg, session: str) -> None:
        """Admit one prompt, marked in flight meanwhile; one whose admission the node's death
        cut ``CRASH_LIMIT`` times is set aside instead (``actors.intake_marks``)."""
        if not is_session_id(session):  # refused at once: nothing there to die on
            return await self._boundary(self.on_prompt, msg)
        cuts, mark = await self.marks.begin(msg.metadata.sequence.stream)
        try:
            if cuts >= CRASH_LIMIT:
                await self._set_aside(msg, session, cuts)
            else:
                await self._boundary(self.on_prompt, msg)
        finally:  # ended with the node alive (a lost partition too): not a cut delivery
            # Off the session's path: a deferred prompt comes back RETRY_S later at the
            # earliest, long after the mark is gone.
            self.spawn(self.marks.end(mark), "intake_mark")

    async def _set_aside(self, msg: Msg, session: str, cuts: int) -> None:
        """Refuse for good a prompt the node died on again and again, saying why."""
        err = InferError(
            ErrorCode.INTERNAL,
            f"the node died {cuts} times while admitting this prompt, so it is set aside "
            "and not admitted: send it again to retry",
            {"reason": "repeated_crash", "cuts": cuts},
        )
        self.log.warning("prompt_set_aside", session=session, cuts=cuts,
                         intake_seq=msg.metadata.sequence.stream)
        await self._reject(session, err, (msg.headers or {}).get(MSG_ID_HEADER), None)
        await self._settle(msg, rejected=True)

    async def on_prompt(self, msg: Msg) -> None:
        """Validate one prompt and have its runner record it."""
        token = self.subjects.session_of_prompt(msg.subject)
        if not is_session_id(token):
            err = InferError(
                ErrorCode.BAD_REQUEST,
                f"{token[:64]!r} is not a valid session id: use 1-128 letters, digits, '_' or '-'",
            )
            await self.publish(self.subjects.rejected(), error_event(err, None))
            return await self._settle(msg, rejected=True)
        answer_to = (msg.headers or {}).get(ANSWER_TO_HEADER)
        key = (msg.headers or {}).get(MSG_ID_HEADER)
        try:
            # Before anything else: even a refusal of the prompt would be published there.
            if answer_to is not None and not self._answerable(token, msg.headers or {}):
                forged, answer_to = answer_to, None  # never published to
                raise InferError(
                    ErrorCode.FORBIDDEN,
                    f"{ANSWER_TO_HEADER} {forged[:64]!r} was not set by the node's ask door: "
                    f"only an ask on {self.subjects.ask(token)} is answered, to its own inbox",
                )
            prompt = self._parse(msg, token)
            key = prompt.idempotency_key or key
            await self.schemas.check(prompt)
        except InferError as e:
            # The key names the refused prompt: a client waiting on it (the gateway) hears why.
            await self._reject(token, e, key, answer_to)
            return await self._settle(msg, rejected=True)
        req = AdmitRequest(
            session=token, prompt=prompt, intake_seq=msg.metadata.sequence.stream,
            idempotency_key=key, answer_to=answer_to, received_at=time.time(),
        )
        try:
            reply = await self.nc.request(
                self.subjects.admit(token), encode(req), timeout=ADMIT_TIMEOUT_S
            )
            outcome: AdmitReply = parse_reply(reply.data, reply.headers, AdmitReply)
            if outcome.outcome == "rejected" and outcome.error is not None:
                body = outcome.error
                raise InferError(body.code, body.message, body.details)
        except InferError as e:
            if e.code in TRANSIENT:
                return await self._defer(msg, token, e)
            await self._reject(token, e, key, answer_to)
            if prompt.relay_from is not None:  # the session whose answer it was hears why
                await self._reject(prompt.relay_from, e, key, None)
            return await self._settle(msg, rejected=True)
        except Exception as e:  # no runner answered: leave it in the stream for later
            return await self._defer(msg, token, e)
        await self._settle(msg, rejected=False)

    def _answerable(self, session: str, headers: dict[str, str]) -> bool:
        """The ask door sealed this ``Infer-Answer-To`` for ``session``, and it names a
        requester's inbox (the door checked that too; a node of another configuration may
        have sealed it)."""
        return is_sealed(self.seal_secret, session, headers) and self.subjects.may_answer(
            headers[ANSWER_TO_HEADER], self.own_inbox
        )

    async def _defer(self, msg: Msg, session: str, error: Exception | str) -> None:
        """Not recorded, but not refused either: the stream offers it again shortly."""
        self.log.warning("admit_deferred", session=session, error=repr(error))
        self.deferred += 1
        self._deferred_now.add(id(msg))
        self.spawn(self._nak(msg, session), f"nak:{session}")

    async def _nak(self, msg: Msg, session: str) -> None:
        """Send the deferral until the consumer's leader confirms it (a request, not a
        publish), in its own task: the partition's next prompts do not wait on it. A
        stopping node gives up after the first try; the next owner takes the consumer over
        and is offered the prompt at once."""
        loop = asyncio.get_running_loop()
        nak = b"-NAK " + json.dumps({"delay": int(RETRY_S * 1e9)}).encode()
        error = ""
        for _ in range(NAK_TRIES):
            sent = loop.time()
            try:
                await self.nc.request(msg.reply, nak, timeout=RETRY_S)
                return
            except Exception as e:  # no leader now: send it again once one may be elected
                error = str(e) or repr(e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), sent + RETRY_S - loop.time())
            if self._stopping.is_set() or self.nc.is_closed:
                break
        # Unconfirmed: JetStream offers the prompt again at its ack deadline anyway.
        self.log.warning("intake_nak_failed", session=session, error=error)

    def _parse(self, msg: Msg, session: str) -> PromptRequest:
        if len(msg.data) > self.max_prompt_bytes:
            raise InferError(
                ErrorCode.TOO_LARGE,
                f"the prompt is {len(msg.data)} bytes; the limit is {self.max_prompt_bytes}",
                {"bytes": len(msg.data), "limit": self.max_prompt_bytes},
            )
        check_json_depth(msg.data, "the prompt")
        try:
            prompt = PromptRequest.model_validate_json(msg.data)
        except ValidationError as e:
            sentence = validation_sentence(e)
            raise InferError(ErrorCode.BAD_REQUEST, f"invalid prompt: {sentence}") from e
        if prompt.session is not None and prompt.session != session:
            raise InferError(
                ErrorCode.BAD_REQUEST,
                f"the prompt names session {prompt.session!r} but was published for {session!r}",
            )
        return prompt

    async def _reject(
        self, session: str, err: InferError, key: str | None, answer_to: str | None
    ) -> None:
        self.log.info("prompt_rejected", session=session, code=err.code.value, reason=err.message)
        event = error_event(err, session, idempotency_key=key)
        await self.publish(self.subjects.events(session, EventKind.ERROR), event)
        if answer_to is not None:  # an ask: its requester waits for this answer
            await self.publish(answer_to, event, headers=error_headers(err))

    async def _settle(self, msg: Msg, rejected: bool) -> None:
        if rejected:
            self.rejected += 1
        else:
            self.admitted += 1
        # Confirmed by the server, so "acked" is a fact the next prompt can rely on.
        try:
            await msg.ack_sync()
        except Exception as e:  # NATS is away: redelivered later, and recorded only once
            self.log.warning("intake_ack_failed", error=str(e) or repr(e))

    def stats(self) -> dict[str, int]:
        """Counters for admin and metrics."""
        return {"admitted": self.admitted, "rejected": self.rejected, "deferred": self.deferred}
