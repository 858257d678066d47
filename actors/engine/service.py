"""What the engine serves: one table of its subjects, handlers and queue groups.

The engine actor subscribes from this table, and so does any stand-in for it (the tests'
scripted engine), so a subject added here is served by both or neither starts: a stand-in
that lacks the handler fails at ``getattr`` instead of leaving a request unanswered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from actors.base import Actor
from schemas.subjects import Subjects


@dataclass(frozen=True)
class Served:
    """One engine subject: the builder of its subject and the handler ``on_<name>``."""

    name: str
    subject: Callable[[Subjects], str]
    queue: str = ""
    """A queue group: one engine of a node's group takes each request (generate, snapshot)."""


ENGINE_SERVES: tuple[Served, ...] = (
    Served("generate", Subjects.engine_generate, queue="engine"),
    Served("cancel", Subjects.engine_cancel_all),
    Served("turn_status", Subjects.engine_turn_status),
    Served("snapshot", Subjects.engine_snapshot, queue="engine"),
    Served("forget", Subjects.engine_forget),
    Served("adopt", Subjects.engine_adopt),
    Served("bank_flush", Subjects.engine_bank_flush),
)


async def subscribe_engine(actor: Actor) -> None:
    """Subscribe ``actor``'s ``on_<name>`` handler to every subject the engine serves."""
    for served in ENGINE_SERVES:
        handler = getattr(actor, f"on_{served.name}")
        await actor.subscribe(served.subject(actor.subjects), handler, queue=served.queue)
