"""The ask door: a request on ``<prefix>.ask.<session>`` becomes a durable prompt.

The door answers nothing itself once the ask is in the intake stream: the prompt goes through
admission and the session runner like any other, with the requester's inbox recorded beside
it (header ``Infer-Answer-To``, sealed by the door: ``actors.seal``), and the runner that
commits the turn publishes the answer there. A node restarted mid-turn rebuilds the session
with that inbox, so the answer still reaches a requester that is still waiting; one that gave
up finds it in the history.
"""

from __future__ import annotations

import uuid

from nats.aio.client import Client
from pydantic import ValidationError

from actors.base import encode, validation_sentence
from actors.seal import seal
from schemas.chat import ChatMessage
from schemas.errors import ErrorCode, InferError
from schemas.json_depth import check_json_depth
from schemas.messages import PromptRequest
from schemas.subjects import (
    ANSWER_SEAL_HEADER,
    ANSWER_TO_HEADER,
    MSG_ID_HEADER,
    Subjects,
    is_session_id,
)


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

    def __init__(self, nc: Client, subjects: Subjects, seal_secret: bytes) -> None:
        self.js = nc.jetstream()
        self.subjects = subjects
        self.seal_secret = seal_secret

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
        msg_id = f"{session}:{key}"
        sealed = {
            MSG_ID_HEADER: msg_id, ANSWER_TO_HEADER: inbox,
            # Admission answers to the inbox only with this: a prompt's own header is not.
            ANSWER_SEAL_HEADER: seal(self.seal_secret, session, msg_id, inbox),
        }
        try:
            # A second ask with this key is stored too (the intake de-duplicates nothing):
            # the session's runner refuses it with 409, told to its own inbox.
            await self.js.publish(self.subjects.prompt(session), encode(prompt), headers=sealed)
        except Exception as e:
            raise InferError(
                ErrorCode.UNAVAILABLE, f"the intake stream did not take the ask ({e}); retry"
            ) from e
