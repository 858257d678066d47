"""The ask door: a request on ``<prefix>.ask.<session>`` becomes a durable prompt.

The door answers nothing itself once the ask is in the intake stream: the prompt goes through
admission and the session runner like any other, with the requester's inbox recorded beside
it (header ``Infer-Answer-To``), and the runner that commits the turn publishes the answer
there. A node restarted mid-turn rebuilds the session with that inbox, so the answer still
reaches a requester that is still waiting; one that gave up finds it in the history.
"""

from __future__ import annotations

import uuid

from nats.aio.client import Client
from pydantic import ValidationError

from actors.base import encode, validation_sentence
from schemas.chat import ChatMessage
from schemas.errors import ErrorCode, InferError
from schemas.json_depth import check_json_depth
from schemas.messages import PromptRequest
from schemas.subjects import ANSWER_TO_HEADER, MSG_ID_HEADER, Subjects, is_session_id


def read_ask(data: bytes) -> PromptRequest:
    """The prompt of an ask body: a JSON prompt (an object), or plain text as a user message."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InferError(ErrorCode.BAD_REQUEST, "the ask body is not UTF-8 text") from e
    if text.lstrip().startswith("{"):
        check_json_depth(data, "the ask")
        try:
            return PromptRequest.model_validate_json(data)
        except ValidationError as e:
            sentence = validation_sentence(e)
            raise InferError(ErrorCode.BAD_REQUEST, f"invalid prompt: {sentence}") from e
    if not text.strip():
        raise InferError(
            ErrorCode.BAD_REQUEST, "the ask is empty: send text, or a prompt as a JSON object"
        )
    return PromptRequest(messages=(ChatMessage(role="user", content=text),))


def _check_answerable(prompt: PromptRequest) -> None:
    """An ask's answer is recorded with its messages, so it needs messages and a turn."""
    if not prompt.reply:
        raise InferError(
            ErrorCode.BAD_REQUEST,
            "an ask wants an answer, and reply: false runs no turn: publish appends on the "
            "prompt subject",
        )
    if not prompt.messages:
        raise InferError(
            ErrorCode.BAD_REQUEST,
            "an ask needs at least one message: retry an aborted turn with an empty prompt on "
            "the prompt subject",
        )


class AskDoor:
    """Puts asks into the intake stream with the inbox their answer goes to."""

    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self.js = nc.jetstream()
        self.subjects = subjects

    async def on_ask(
        self, subject: str, data: bytes, headers: dict[str, str] | None, inbox: str
    ) -> None:
        """Record the ask durably; raises ``InferError`` when it is refused at the door."""
        session = self.subjects.session_of_ask(subject)
        if not is_session_id(session):
            raise InferError(
                ErrorCode.BAD_REQUEST,
                f"{session[:64]!r} is not a valid session id: use 1-128 letters, digits, "
                "'_' or '-'",
            )
        prompt = read_ask(data)
        _check_answerable(prompt)
        key = prompt.idempotency_key or (headers or {}).get(MSG_ID_HEADER) or uuid.uuid4().hex
        if prompt.idempotency_key != key:
            prompt = prompt.model_copy(update={"idempotency_key": key})
        try:
            ack = await self.js.publish(
                self.subjects.prompt(session), encode(prompt),
                # Session and key: JetStream de-duplicates ids across the whole stream.
                headers={MSG_ID_HEADER: f"{session}:{key}", ANSWER_TO_HEADER: inbox},
            )
        except Exception as e:
            raise InferError(
                ErrorCode.UNAVAILABLE, f"the intake stream did not take the ask ({e}); retry"
            ) from e
        if ack.duplicate:
            # The first ask with this key is the one answered: its inbox is recorded.
            raise InferError(
                ErrorCode.CONFLICT,
                f"an ask with idempotency key {key!r} was already accepted; its answer goes "
                f"to that ask and is in the history of session {session}",
                {"idempotency_key": key},
            )
