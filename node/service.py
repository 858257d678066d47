"""The node's NATS micro service: ``ask`` and the admin verbs as endpoints.

``$SRV.PING/INFO/STATS`` (what ``nats micro ls/info/stats`` show) list the endpoints and
count, per endpoint, requests, errors and processing time. ``nats.micro`` counts an error
only when the handler raises, and then replies with its own headers and an empty body; so a
refusal is raised to it with the reply's body set to infernode's typed error event. One
reply goes out, with ``Infer-Error`` (infernode's code) and ``Nats-Service-Error`` /
``Nats-Service-Error-Code`` (micro's), and the error is counted.

An ask's processing time is the time to make it durable; its answer comes later from the
session runner that commits the turn (see ``node/ask.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import nats.micro
from nats.aio.client import Client
from nats.micro.request import Request, ServiceError
from pydantic import BaseModel, ValidationError

from actors.base import Actor, encode, error_event, validation_sentence
from node.admin import AdminActor
from node.ask import AskDoor
from schemas.errors import ErrorCode, InferError
from schemas.subjects import (
    ERROR_HEADER,
    INBOX_ROOT,
    AdminVerb,
    EventKind,
    Subjects,
    is_session_id,
)

Verb = Callable[[bytes], Awaitable[BaseModel | None]]


def reply_subject(request: Request) -> str:
    """Where the request wants its reply ("" for none).

    ``nats.micro``'s ``Request`` does not expose it; the ask door must record it so the
    answer reaches the requester from whichever node process commits the turn.
    """
    return request._msg.reply or ""


class NodeService(Actor):
    """Registers the micro service; its endpoints call the ask door and the admin actor."""

    name = "service"

    def __init__(
        self, nc: Client, subjects: Subjects, admin: AdminActor, version: str,
        metadata: dict[str, str], seal_secret: bytes,
    ) -> None:
        super().__init__(nc, subjects)
        self.admin = admin
        self.door = AskDoor(nc, subjects, seal_secret)
        self.own_inbox = nc.new_inbox().rpartition(".")[0]
        """The prefix of the node's reply inboxes (its connections share one)."""
        self.version = version
        self.metadata = metadata
        self.service: nats.micro.Service | None = None

    async def start(self) -> None:
        """Register the service and its endpoints."""
        s = self.subjects
        self.service = await nats.micro.add_service(
            self.nc, name=s.service_name, version=self.version, metadata=self.metadata,
            description="actor-model LLM inference node: prompts on "
            f"{s.prompt_all()}, asks on {s.ask_all()}, events on {s.events_all()}",
        )
        await self.service.add_endpoint(
            name="ask", subject=s.ask_all(), handler=self.on_ask,
            metadata={"reply": "answer.v1, or error.v1 with header Infer-Error"},
        )
        verbs: dict[AdminVerb, Verb] = {
            AdminVerb.HEALTH: self.admin.on_health,
            AdminVerb.SESSIONS: self.admin.on_sessions,
            AdminVerb.SESSION: self.admin.on_session,
            AdminVerb.METRICS: self.admin.on_metrics,
            AdminVerb.DELETE: self.admin.on_delete,
            AdminVerb.COUNT_TOKENS: self.admin.on_count_tokens,
        }
        for verb, handler in verbs.items():
            await self.service.add_endpoint(
                name=verb.value, subject=s.admin(verb), handler=functools.partial(
                    self.on_admin, handler
                ),
                # Every node answers the node-wide verbs (a queue group of its own), so a
                # client gathers them all; the others go to one node of the default group.
                queue_group=s.admin_group(verb),
            )

    async def stop(self) -> None:
        """Unregister: no new asks or admin requests reach this node."""
        if self.service is not None:
            try:
                await self.service.stop()
            except Exception as e:  # a closed connection has nothing left to stop
                self.log.debug("service_stop_failed", error=str(e))
            self.service = None
        await super().stop()

    async def on_ask(self, request: Request) -> None:
        """Put the ask into the intake stream; the committing runner answers it."""
        inbox = reply_subject(request)
        if not self.subjects.may_answer(inbox, self.own_inbox):
            # Nowhere safe to answer (none given, or no requester's inbox): the refusal goes
            # to the session's error events only.
            self.log.warning("ask_not_answerable", subject=request.subject, reply=inbox[:128])
            await self._refuse_unanswerable(request.subject, inbox)
            return
        await self._guard(request, self.door.on_ask(
            request.subject, request.data, request.headers, inbox
        ))

    async def _refuse_unanswerable(self, subject: str, inbox: str) -> None:
        session = self.subjects.session_of_ask(subject)
        err = InferError(
            ErrorCode.FORBIDDEN,
            f"the ask's reply subject {inbox[:64]!r} is not a requester's inbox (one under "
            f"{INBOX_ROOT}, not the node's own): the node answers nowhere else",
        )
        where = (self.subjects.events(session, EventKind.ERROR) if is_session_id(session)
                 else self.subjects.rejected())
        await self.publish(where, error_event(err, session if is_session_id(session) else None))

    async def on_admin(self, verb: Verb, request: Request) -> None:
        """Answer an admin verb with its reply model (a publish without a reply runs it too)."""
        reply = await self._guard(request, verb(request.data))
        if reply is not None and reply_subject(request):
            await request.respond(encode(reply))

    async def _guard(
        self, request: Request, work: Awaitable[BaseModel | None]
    ) -> BaseModel | None:
        try:
            return await work
        except InferError as e:
            err = e
        except ValidationError as e:
            err = InferError(ErrorCode.BAD_REQUEST, validation_sentence(e))
        except Exception as e:
            self.log.exception("endpoint_failed", subject=request.subject, error=str(e))
            err = InferError(ErrorCode.INTERNAL, f"internal error: {e}")
        if not reply_subject(request):  # nobody to tell; raising would fail inside nats.micro
            self.errors += 1
            self.log.info("request_refused", subject=request.subject, code=err.code.value)
            return None
        # nats.micro sends the error reply when the handler raises (and counts it there):
        # its reply carries the typed error event as the body.
        request.respond_error = functools.partial(  # type: ignore[method-assign]
            request.respond_error, data=encode(error_event(err)),
            headers={ERROR_HEADER: err.code.value},
        )
        raise ServiceError(str(err.status), " ".join(err.message.split())[:1024])
