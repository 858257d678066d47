"""Following the turn that answers one prompt, from a session's events: one reading for all.

The client library (``node/client.py``), the CLI through it, and every HTTP door through the
gateway's ``NodeTurn`` (``actors/gateway/turns.py``) read a session's events with this one
``TurnFollower``, so they agree on what belongs to the turn: the prompt's ``accepted`` (by its
idempotency key), the ``started`` whose parents are its records, then that turn's tokens,
tool-call deltas, prefill progress, ``done`` and ``commit``. A turn the node cut and runs
again by itself (``RERUN_REASONS``: it stopped or restarted, the bus lost the result) is
followed on into the rerun, whose ``started`` names the same parents; any other abort, and an
error of the prompt or the turn, ends the following. It reads events and keeps no connection:
each caller subscribes (before it publishes) and waits on its own deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from schemas.errors import InferError
from schemas.messages import (
    AbortedEvent,
    AcceptedEvent,
    CommitEvent,
    DoneEvent,
    ErrorEvent,
    PromptProgressEvent,
    StartedEvent,
    TokenEvent,
    ToolCallEvent,
)
from schemas.records import RERUN_REASONS
from schemas.subjects import EventKind

EVENT_MODELS: dict[str, type[BaseModel]] = {
    EventKind.ACCEPTED: AcceptedEvent,
    EventKind.STARTED: StartedEvent,
    EventKind.TOKEN: TokenEvent,
    EventKind.TOOL_CALL: ToolCallEvent,
    EventKind.PROMPT_PROGRESS: PromptProgressEvent,
    EventKind.DONE: DoneEvent,
    EventKind.COMMIT: CommitEvent,
    EventKind.ABORTED: AbortedEvent,
    EventKind.ERROR: ErrorEvent,
}
"""The model of each event kind a follower reads (the others are not about its turn)."""

TurnEvent = TokenEvent | ToolCallEvent | DoneEvent | CommitEvent | PromptProgressEvent
"""What following a turn hands on."""


class TurnAborted(Exception):
    """The turn answering the prompt was aborted (by a client, an operator, a deletion), and
    the node does not run it again."""

    def __init__(self, event: AbortedEvent) -> None:
        super().__init__(f"turn {event.turn_id} was aborted ({event.reason})")
        self.event = event


def read_event(kind: str, data: bytes) -> BaseModel | None:
    """The event of ``kind`` in ``data``; None for a kind a follower does not read, or an
    event it cannot read (another node version's)."""
    model = EVENT_MODELS.get(kind)
    if model is None:
        return None
    try:
        return model.model_validate_json(data)
    except ValidationError:
        return None


@dataclass
class TurnFollower:
    """Where the turn answering the prompt with idempotency key ``key`` stands."""

    key: str
    message_ids: tuple[str, ...] = ()
    """The prompt's records, once ``accepted`` named them."""
    turn_id: str | None = None
    """The turn answering them, once it ``started`` (None again while a rerun is awaited)."""
    done: DoneEvent | None = None
    commit: CommitEvent | None = None
    reruns: int = 0
    """Turns over the prompt that the node cut and ran again."""

    @property
    def accepted(self) -> bool:
        """Whether the session recorded the prompt."""
        return bool(self.message_ids)

    def step(self, event: BaseModel) -> TurnEvent | AbortedEvent | None:
        """Take in one event of the session; what it is for the turn.

        The turn's tokens, tool-call deltas, progress, ``done`` and ``commit`` come back; so
        does the ``aborted`` of a turn the node runs again (the rerun's events follow, from
        its own first token). None for what is not about the turn. Raises ``InferError`` on
        an error of the prompt or of the turn, ``TurnAborted`` on any other abort.
        """
        if isinstance(event, AcceptedEvent) and event.idempotency_key == self.key:
            self.message_ids = event.message_ids
        elif isinstance(event, ErrorEvent) and (
            event.idempotency_key == self.key
            or (event.turn_id and event.turn_id == self.turn_id)
        ):
            raise InferError(event.code, event.message, event.details)
        elif isinstance(event, StartedEvent) and set(self.message_ids) & set(event.parent_ids):
            self.turn_id = event.turn_id
        elif self.turn_id is None or getattr(event, "turn_id", None) != self.turn_id:
            return None
        elif isinstance(event, AbortedEvent):
            if event.reason not in RERUN_REASONS:
                raise TurnAborted(event)
            self.turn_id, self.done = None, None
            self.reruns += 1
            return event
        elif isinstance(event, TurnEvent):
            if isinstance(event, DoneEvent):
                self.done = event
            elif isinstance(event, CommitEvent):
                self.commit = event
            return event
        return None
