"""The commands in a session runner's mailbox, and how one that is not handled is answered.

Every command that someone waits on carries the future its answer goes to; a command left
over when the runner closes (deleted, or the node stopping) is answered with the error
that says why, so no caller waits for ever.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from actors.session.turn import Turn
from schemas.errors import ErrorCode, InferError
from schemas.internal import AdmitReply, AdmitRequest, ErrorBody, GenerateResult
from schemas.messages import AbortReply


@dataclass
class Admit:
    """Record a prompt."""

    req: AdmitRequest
    done: asyncio.Future[AdmitReply]


@dataclass
class TurnDone:
    """The engine answered the running turn (or was given up on)."""

    turn: Turn
    result: GenerateResult


@dataclass
class Abort:
    """Abort the running turn."""

    reason: str
    done: asyncio.Future[AbortReply]


@dataclass
class Delete:
    """Delete the session."""

    done: asyncio.Future[None]


@dataclass
class Resume:
    """Answer what is pending."""


Command = Admit | TurnDone | Abort | Delete | Resume


def rejected(err: InferError) -> AdmitReply:
    """An admit reply refusing the prompt with ``err``."""
    return AdmitReply(
        outcome="rejected", error=ErrorBody(code=err.code, message=err.message, details=err.details)
    )


def fail(cmd: Command, e: BaseException) -> None:
    """Answer a command that will not be handled."""
    fut = getattr(cmd, "done", None)
    if fut is None or fut.done():
        return
    err = e if isinstance(e, InferError) else InferError(ErrorCode.INTERNAL, str(e))
    if isinstance(cmd, Admit):
        fut.set_result(rejected(err))
    else:
        fut.set_exception(err)


def chain(source: asyncio.Future[None], target: asyncio.Future[None]) -> None:
    """Resolve ``target`` as ``source`` was resolved (a second delete waits for the first)."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(None)


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set; False after ``timeout`` seconds."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True
