"""One turn per ``Idempotency-Key``, across every gateway in front of a node.

The first request with a key claims it with a JetStream KV *create* (which only one writer
can win, whichever gateway it runs on), storing a hash of its body. That request runs the
turn and replaces the claim with its answer; every other request with the key waits on a KV
watch for that answer, with a deadline. A request whose turn fails unanswered deletes its
claim, so a waiting one claims the key next. A claim left by a gateway that died expires at
``claimed_until`` and is taken over. The same key with another body is refused 422, as
Stripe's API does: it is a client bug, and silently answering the old request hides it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from nats.errors import Error as NatsError
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from actors.gateway.wire import ChatCompletionRequest
from schemas.errors import ErrorCode, InferError
from schemas.gateway import IdempotencyEntry, answer_key

_SHOWN_KEY = 128
"""Characters of a client's key quoted back in an error sentence."""


@dataclass(frozen=True)
class Claim:
    """This request owns its key: it runs the turn and stores the answer."""

    key: str
    """The scoped key (see ``calls.scoped_key``)."""
    request: str
    """Hash of the request's body."""
    revision: int
    """KV revision of the claim, so only this claim is deleted when it fails."""


def request_digest(req: ChatCompletionRequest, named: str | None) -> str:
    """Hash of what a request asks: its fields and named session, not how it is delivered
    (streamed or not: a retry may ask the kept answer either way)."""
    fields = req.model_dump(mode="json", exclude={"stream", "stream_options"})
    text = json.dumps([named, fields], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class KeyClaims:
    """Claims and answers of idempotency keys in the gateways' answers bucket."""

    def __init__(self, kv: KeyValue, hold_s: float) -> None:
        self.kv = kv
        self.hold_s = hold_s
        """How long an unanswered claim stands, and how long a waiter waits for it."""

    async def claim(self, key: str, request: str, shown: str) -> Claim | IdempotencyEntry:
        """Own ``key``, or the answer it was given (waiting for one in flight)."""
        deadline = time.time() + self.hold_s
        while True:
            mine = IdempotencyEntry(request=request, claimed_until=time.time() + self.hold_s)
            try:
                return Claim(key, request, await self.kv.create(answer_key(key), _enc(mine)))
            except KeyWrongLastSequenceError:
                pass  # held already: read whose it is
            entry, revision = await self._read(key)
            if revision == 0:
                continue  # deleted meanwhile: try again
            if entry is not None and entry.request != request:
                raise _mismatch(shown)
            if entry is not None and entry.completion is not None:
                return entry
            if entry is None or entry.claimed_until < time.time():
                taken = await self._take_over(key, mine, revision)
                if taken is not None:
                    return taken
                continue
            if time.time() >= deadline:
                raise _still_running(shown)
            await self._changed(key, revision, min(deadline, entry.claimed_until))

    async def answered(self, claim: Claim, session: str, body: dict[str, Any]) -> None:
        """The claim's turn committed: keep its answer for every request with the key."""
        entry = IdempotencyEntry(request=claim.request, claimed_until=time.time(),
                                 session=session, completion=json.dumps(body))
        await self.kv.put(answer_key(claim.key), _enc(entry))

    async def release(self, claim: Claim) -> None:
        """The claim's request failed unanswered: free the key (unless taken over since)."""
        # A refusal means the revision is gone (another request owns the key now); a lost
        # connection leaves the claim to expire at its ``claimed_until``.
        with contextlib.suppress(APIError, NatsError):
            await self.kv.delete(answer_key(claim.key), last=claim.revision)

    async def _read(self, key: str) -> tuple[IdempotencyEntry | None, int]:
        """The entry (None when unreadable: another version's) and its revision (0: none)."""
        try:
            got = await self.kv.get(answer_key(key))
        except KeyNotFoundError:
            return None, 0
        try:
            return IdempotencyEntry.model_validate_json(got.value or b""), got.revision or 0
        except ValidationError:
            return None, got.revision or 0

    async def _take_over(
        self, key: str, mine: IdempotencyEntry, revision: int
    ) -> Claim | None:
        """Replace a dead (or unreadable) claim with ours, if nobody changed it meanwhile."""
        try:
            new = await self.kv.update(answer_key(key), _enc(mine), last=revision)
        except KeyWrongLastSequenceError:
            return None
        return Claim(key, mine.request, new)

    async def _changed(self, key: str, revision: int, until: float) -> None:
        """Return once the entry moves past ``revision`` (answered, deleted) or at ``until``."""
        watcher = await self.kv.watch(answer_key(key))
        try:
            async with asyncio.timeout(max(until - time.time(), 0.0)):
                async for entry in watcher:
                    if entry is not None and (
                        (entry.revision or 0) > revision or entry.operation in (KV_DEL, KV_PURGE)
                    ):
                        return
        except TimeoutError:
            return
        finally:
            await watcher.stop()


def _mismatch(shown: str) -> InferError:
    return InferError(
        ErrorCode.IDEMPOTENCY_MISMATCH,
        f"Idempotency-Key {shown[:_SHOWN_KEY]!r} was already used with a different request "
        "body; use a new key for a new request",
        {"param": "Idempotency-Key"},
    )


def _still_running(shown: str) -> InferError:
    return InferError(
        ErrorCode.CONFLICT, f"a request with Idempotency-Key {shown[:_SHOWN_KEY]!r} is still "
        "being answered; retry it shortly", {"retry_after_s": 1},
    )


def _enc(entry: IdempotencyEntry) -> bytes:
    return entry.model_dump_json().encode()
