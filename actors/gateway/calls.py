"""One chat completion end to end: plan the session, run the turn, answer in OpenAI's shape.

A call holds its session's lock (on this gateway) from the publish until the commit, so two
calls of one conversation never race into one coalesced turn: a call whose session is busy
forks instead of waiting (it cannot know whether it extends the running turn's answer), and
across gateways the ``expect_generation`` check turns such a race into a fork too. A call
whose client goes away before the answer aborts the turn, and the conversation index
forgets that branch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from actors.base import encode, parse_reply
from actors.gateway.idempotency import Claim, KeyClaims
from actors.gateway.responses import SSE_DONE, CompletionShape, answer_message
from actors.gateway.sessions import Plan, SessionRouter
from actors.gateway.stream import ContentFilter, ToolCallRelay, progress_comment
from actors.gateway.turns import DuplicatePromptError, NodeTurn, TurnAbortedError
from actors.gateway.wire import ChatCompletionRequest, prompt_for
from schemas.admin import CountTokensReply, CountTokensRequest
from schemas.errors import ErrorCode, InferError
from schemas.gateway import IdempotencyEntry
from schemas.messages import (
    CommitEvent,
    DoneEvent,
    PromptProgressEvent,
    TokenEvent,
    ToolCallEvent,
)
from schemas.subjects import AdminVerb, Subjects

log = structlog.get_logger("gateway")

@dataclass
class OpenCall:
    """A call whose prompt the session recorded; its answer is still to come."""

    service: ChatService
    plan: Plan
    turn: NodeTurn
    shape: CompletionShape
    lock: asyncio.Lock
    claim: Claim | None
    finished: bool = False
    done: DoneEvent | None = None
    _released: bool = field(default=False, repr=False)
    _answered: bool = field(default=False, repr=False)
    _opened: tuple[AsyncGenerator[Any], list[Any]] | None = field(default=None, repr=False)

    @property
    def session(self) -> str:
        """The session id the client sees."""
        return self.plan.visible

    async def opened(self) -> None:
        """Wait for the turn's first event (its prefill's progress, a token, a call), so a
        turn the node refuses before answering — a prompt the context cannot hold — is an
        HTTP error status, not an error inside a stream already answered 200. A stream then
        starts with that event (``events`` gives it again)."""
        follow = self.events(progress=True)
        first: list[Any] = []
        with contextlib.suppress(StopAsyncIteration):
            first.append(await anext(follow))
        self._opened = (follow, first)

    async def events(
        self, progress: bool = False
    ) -> AsyncGenerator[TokenEvent | ToolCallEvent | DoneEvent | PromptProgressEvent]:
        """The turn's tokens, tool-call deltas and done event (with ``progress``, a long
        prefill's progress first); the commit is recorded before this ends."""
        if self._opened is not None:  # what ``opened`` started, from its first event on
            (follow, first), self._opened = self._opened, None
            async with contextlib.aclosing(follow):
                for event in first:
                    yield event
                async for event in follow:
                    yield event
            return
        try:
            async for event in self.turn.events(progress):
                if isinstance(event, CommitEvent):
                    await self._committed(event)
                    return
                if isinstance(event, DoneEvent):
                    self.done = event
                yield event
        except TurnAbortedError as e:
            self.finished = True
            await self.service.router.aborted(self.plan)
            await self.release()
            raise InferError(
                ErrorCode.UNAVAILABLE, f"the turn was aborted ({e.event.reason}); retry the "
                "request", {"retry_after_s": 1},
            ) from e
        finally:
            if not self.finished:
                await self._give_up()

    async def complete(self) -> dict[str, Any]:
        """The whole answer as a ``chat.completion``."""
        async for _ in self.events():
            pass
        assert self.done is not None
        return self.shape.completion(self.done, self.session)

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        """The answer as server-sent events in OpenAI's chunk shape."""
        # The engine parses calls unless tool_choice is none; only then is markup hidden.
        shown = ContentFilter(hides_calls=self.turn.prompt.tool_choice != "none")
        calls = ToolCallRelay()
        yield self.shape.chunk({"role": "assistant", "content": ""})
        # Closed with the stream, so a client leaving mid-answer aborts the turn at once.
        async with contextlib.aclosing(self.events(progress=True)) as events:
            async for event in events:
                if isinstance(event, PromptProgressEvent):
                    yield progress_comment(event)
                elif isinstance(event, TokenEvent):
                    text = shown.feed(event.text)
                    if text:
                        yield self.shape.chunk({"content": text})
                elif isinstance(event, ToolCallEvent):
                    yield self.shape.chunk({"tool_calls": calls.deltas(event)})
                else:
                    for line in self._ending(event, shown, calls, include_usage):
                        yield line
        yield SSE_DONE

    def _ending(
        self, done: DoneEvent, shown: ContentFilter, calls: ToolCallRelay, include_usage: bool
    ) -> list[str]:
        """Held text, what the stream missed of done's calls, the finish reason, the usage."""
        lines = []
        tail = shown.flush()
        if tail:
            lines.append(self.shape.chunk({"content": tail}))
        rest = calls.rest(done)
        if rest:
            lines.append(self.shape.chunk({"tool_calls": rest}))
        lines.append(self.shape.finish(done))
        if include_usage:
            lines.append(self.shape.chunk({}, usage_of=done, empty=True))
        return lines

    async def _committed(self, commit: CommitEvent) -> None:
        self.finished = True
        assert self.done is not None
        try:
            await self.service.router.committed(self.plan, answer_message(self.done),
                                                commit.generation)
            if self.claim is not None:
                body = self.shape.completion(self.done, self.session)
                await self.service.claims.answered(self.claim, self.session, body)
                self._answered = True
        finally:
            await self.release()

    async def _give_up(self) -> None:
        """The client left or the turn failed before its commit: stop it and let go."""
        self.finished = True
        try:
            if self.done is None:
                await asyncio.shield(self._abort())
        finally:
            await self.release()

    async def _abort(self) -> None:
        await self.turn.abort("client_disconnected")
        await self.service.router.aborted(self.plan)
        log.info("gateway_turn_aborted", session=self.plan.session)

    async def release(self) -> None:
        """Stop listening and free the session for the next call."""
        if self._released:
            return
        self._released = True
        await self.turn.close()
        self.lock.release()
        if self.claim is not None and not self._answered:
            await self.service.claims.release(self.claim)


class ChatService:
    """Runs chat completions against the node over NATS."""

    def __init__(
        self, nc: Client, subjects: Subjects, router: SessionRouter, turn_timeout: float,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.router = router
        self.turn_timeout = turn_timeout
        self.model = "infernode"
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self.claims = KeyClaims(router.index.answers, turn_timeout)

    async def claim(
        self, agent: str, client_key: str, request: str
    ) -> Claim | IdempotencyEntry:
        """Own this ``Idempotency-Key`` (run the turn), or the answer it was given, waiting
        for one in flight on any gateway."""
        return await self.claims.claim(scoped_key(agent, client_key), request, client_key)

    async def count_tokens(self, req: ChatCompletionRequest) -> int:
        """Tokens of the prompt a first turn over the request's conversation would hold,
        rendered and tokenised by a node (admin ``count_tokens``)."""
        body = encode(CountTokensRequest(messages=req.chat_messages(),
                                         tools=tuple(req.tools or ())))
        try:
            msg = await self.nc.request(self.subjects.admin(AdminVerb.COUNT_TOKENS), body,
                                        timeout=30)
        except (NoRespondersError, NatsTimeoutError) as e:
            raise InferError(ErrorCode.UNAVAILABLE, "no node answered the token count; is "
                             "`infernode up` running against this NATS server?") from e
        reply: CountTokensReply = parse_reply(msg.data, msg.headers, CountTokensReply)
        return reply.prompt_tokens

    async def open(
        self, agent: str, req: ChatCompletionRequest, hint: str | None, claim: Claim | None
    ) -> OpenCall:
        """Plan the call (under the affinity ``hint``, if any), publish its prompt and return
        once the session recorded it."""
        try:
            return await self._open(agent, req, hint, claim)
        except BaseException:
            if claim is not None:  # unanswered: the key is free for a retry
                await asyncio.shield(self.claims.release(claim))
            raise

    async def _open(
        self, agent: str, req: ChatCompletionRequest, hint: str | None, claim: Claim | None
    ) -> OpenCall:
        plan = await self.router.plan(agent, hint, req.chat_messages(), self._busy)
        for attempt in range(2):
            if self._busy(plan.session):
                log.info("gateway_busy_forked", session=plan.session)
                plan = self.router.fork(plan)
            lock = self._locks.setdefault(plan.session, asyncio.Lock())
            await lock.acquire()  # free: nothing ran since the check
            key = _attempt_key(claim, plan, attempt)
            turn = NodeTurn(self.nc, self.subjects, plan.session,
                            prompt_for(req, plan.new_messages, key, plan.expect_generation),
                            self.turn_timeout)
            try:
                await turn.start()
            except InferError as e:
                await turn.close()
                lock.release()
                if e.code != ErrorCode.CONFLICT or attempt or (
                    plan.base == 0 and plan.hint is None
                ):
                    raise
                # The session moved on, on another gateway or over NATS: never append blindly.
                plan = self.router.fork(plan)
                continue
            except DuplicatePromptError:
                await turn.close()
                lock.release()
                raise InferError(
                    ErrorCode.CONFLICT, "a request with this Idempotency-Key is still being "
                    "answered; retry it shortly", {"retry_after_s": 1},
                ) from None
            except BaseException:
                await turn.close()
                lock.release()
                raise
            shape = CompletionShape(f"chatcmpl-{uuid.uuid4().hex}", self.model)
            return OpenCall(self, plan, turn, shape, lock, claim)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _busy(self, session: str) -> bool:
        """Whether a call on this gateway holds ``session`` (its turn not yet committed)."""
        lock = self._locks.get(session)
        return lock is not None and lock.locked()


def scoped_key(agent: str, client_key: str) -> str:
    """An agent's ``Idempotency-Key`` as a key no other agent can hit."""
    return hashlib.sha256(f"{agent}\0{client_key}".encode()).hexdigest()


def _attempt_key(claim: Claim | None, plan: Plan, attempt: int) -> str:
    # A fork is a different prompt, so it must not look like a retry of the first one; nor
    # is a new claim of the key (its first request failed unanswered) a retry of the last.
    if claim is None:
        return uuid.uuid4().hex
    text = f"{claim.key}\0{claim.revision}\0{plan.session}\0{attempt}"
    return hashlib.sha256(text.encode()).hexdigest()
