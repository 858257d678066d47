"""The OpenAI Responses API door: a ``response`` object run as a chat completion, its
server-sent events, and the stored responses that ``previous_response_id`` continues.

A request is translated (``responses_wire``) and run by the ``ChatService`` like any chat
completion, so it plans its session, reuses the KV prefix and forks exactly as the chat door
does. What is this door's own: the ``response`` shape and its typed events, and the record
of each stored response (its session and whole conversation, in the gateway's KV bucket
under ``r.<id>``), so a request naming it sends only its new items. Codex and the agents
SDK send their own session ids (``session_id``, ``thread-id`` headers, ``prompt_cache_key``):
those are affinity hints, the session the conversation goes to.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from actors.gateway.calls import ChatService, OpenCall
from actors.gateway.responses import answer_message, sse
from actors.gateway.responses_wire import (
    FunctionChoice,
    ResponsesRequest,
    chat_request,
    input_messages,
    parse_responses_request,
)
from actors.gateway.sessions import affinity_hint
from actors.gateway.stream import ContentFilter, ToolCallRelay, progress_comment
from schemas.chat import ChatMessage
from schemas.errors import ErrorCode, InferError
from schemas.gateway import ResponseRecord, response_key
from schemas.messages import DoneEvent, PromptProgressEvent, TokenEvent, ToolCallEvent

log = structlog.get_logger("gateway")

_RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{32}$")


class ResponseStore:
    """Stored responses by id, in the gateway's conversations bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, agent: str, response_id: str) -> ResponseRecord:
        """The agent's stored response ``response_id``, or a 404 naming it."""
        record = None
        if _RESPONSE_ID.match(response_id):
            with contextlib.suppress(KeyNotFoundError, ValidationError):
                entry = await self.kv.get(response_key(response_id))
                record = ResponseRecord.model_validate_json(entry.value or b"")
        if record is None or record.agent != agent:  # another agent's id is as unknown
            raise InferError(
                ErrorCode.UNKNOWN_SESSION, f"previous_response_id {response_id[:64]!r} names "
                "no stored response; send the whole conversation as input instead",
                {"param": "previous_response_id"},
            )
        return record

    async def put(self, response_id: str, record: ResponseRecord) -> None:
        """Keep a response; one too large for the bucket is answered but not kept."""
        try:
            await self.kv.put(response_key(response_id), record.model_dump_json().encode())
        except NatsError as e:
            log.warning("gateway_response_not_stored", response=response_id, error=repr(e))


class ResponsesService:
    """Opens Responses API calls on a ``ChatService``."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat
        self.store = ResponseStore(chat.router.index.conversations)

    async def open(self, agent: str, body: bytes, headers: Mapping[str, str]) -> ResponseRun:
        """Parse, plan and publish the call; return once the session recorded its prompt.

        The stored response a request continues names its session; else the agent's own
        conversation id (a header, ``prompt_cache_key``, ``metadata.session_id``) is the
        call's affinity hint."""
        req = parse_responses_request(body)
        history: tuple[ChatMessage, ...] = ()
        if req.previous_response_id is not None:
            record = await self.store.get(agent, req.previous_response_id)
            history, hint = record.messages, record.session
        else:
            hint = affinity_hint(headers, req.prompt_cache_key,
                                 (req.metadata or {}).get("session_id"))
        system = (ChatMessage(role="system", content=req.instructions),) if req.instructions else ()
        chat = chat_request(req, [*system, *history, *input_messages(req)])
        call = await self.chat.open(agent, chat, hint, None)
        shape = ResponseShape(f"resp_{uuid.uuid4().hex}", self.chat.model, req)
        return ResponseRun(self, req, call, shape, agent, len(system))


@dataclass
class ResponseShape:
    """The ids and echoed request fields every object of one response shares."""

    id: str
    model: str
    req: ResponsesRequest
    created_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def message_id(self) -> str:
        """The id of the response's message item."""
        return "msg_" + self.id.removeprefix("resp_")

    def body(
        self, status: str, output: list[dict[str, Any]], done: DoneEvent | None = None,
        session: str | None = None, error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The ``response`` object."""
        req = self.req
        incomplete = status == "incomplete"
        fmt = req.text.format if req.text and req.text.format else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "model": self.model, "output": output, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {}, "previous_response_id": req.previous_response_id,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "temperature": req.temperature, "top_p": req.top_p, "store": req.store,
            "tool_choice": _echo_choice(req), "truncation": req.truncation or "disabled",
            "tools": [t.model_dump(exclude_none=True) for t in req.function_tools()],
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)
                     if fmt else {"type": "text"}},
            "user": req.user, "usage": usage(done) if done is not None else None,
            "infernode": _extras(done, session) if done is not None else None,
        }

    def status(self, done: DoneEvent) -> str:
        """``incomplete`` when the answer was cut at ``max_output_tokens``."""
        return "incomplete" if done.finish_reason == "length" else "completed"

    def message(self, text: str, status: str) -> dict[str, Any]:
        """The message item."""
        return {"type": "message", "id": self.message_id, "status": status,
                "role": "assistant", "content": [_text_part(text)] if status != "in_progress"
                else []}


def _echo_choice(req: ResponsesRequest) -> Any:
    choice = req.tool_choice
    if isinstance(choice, FunctionChoice):
        return choice.model_dump()
    return choice or "auto"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    """A ``function_call`` output item (its ``id`` made of the call's)."""
    return {"type": "function_call", "id": "fc_" + call_id.removeprefix("call_"),
            "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def output_items(shape: ResponseShape, done: DoneEvent) -> list[dict[str, Any]]:
    """The output of a finished answer: its text (when it has text or no calls), its calls."""
    items = []
    if done.text or not done.tool_calls:
        items.append(shape.message(done.text, shape.status(done)))
    items += [call_item(c.id, c.function.name, c.function.arguments, "completed")
              for c in done.tool_calls]
    return items


def usage(done: DoneEvent) -> dict[str, Any]:
    """Responses usage, with the reused prefix in ``input_tokens_details.cached_tokens`` and
    what the context window left out of the history in its ``dropped_tokens`` and
    ``dropped_turns`` (infernode's)."""
    u = done.usage
    return {
        "input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0,
                                 "dropped_tokens": u.dropped_tokens,
                                 "dropped_turns": u.dropped_turns},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _extras(done: DoneEvent, session: str | None) -> dict[str, Any]:
    return {"session": session, "cache_source": done.cache.source,
            "miss_reason": done.cache.miss_reason, "ttft_ms": done.timings.ttft_ms}


@dataclass
class ResponseRun:
    """A Responses call whose prompt the session recorded; its answer is still to come."""

    service: ResponsesService
    req: ResponsesRequest
    call: OpenCall
    shape: ResponseShape
    agent: str
    instructions: int
    """1 when the conversation starts with the request's ``instructions`` message."""

    async def complete(self) -> dict[str, Any]:
        """The whole answer as a ``response`` object."""
        async for _ in self.call.events():
            pass
        done = self.call.done
        assert done is not None
        await self._keep(done)
        return self.shape.body(self.shape.status(done), output_items(self.shape, done), done,
                               self.call.session)

    async def stream(self) -> AsyncIterator[str]:
        """The answer as the Responses API's typed server-sent events; a failure after the
        stream opened is a ``response.failed`` event."""
        seq = itertools.count()
        out = OutputEvents(self.shape, seq, hides_calls=self.call.turn.prompt.tool_choice
                           != "none")
        for kind in ("response.created", "response.in_progress"):
            yield event(kind, seq, response=self.shape.body("in_progress", []))
        try:
            async with contextlib.aclosing(self.call.events(progress=True)) as events:
                async for ev in events:
                    if isinstance(ev, PromptProgressEvent):
                        yield progress_comment(ev)
                        continue
                    for line in out.feed(ev):
                        yield line
            done = self.call.done
            assert done is not None
            await self._keep(done)
        except InferError as e:
            error = {"code": "server_error", "message": e.message}
            yield event("response.failed", seq,
                        response=self.shape.body("failed", [_public(i) for i in out.items],
                                                  error=error))
            return
        status = self.shape.status(done)
        body = self.shape.body(status, out.items, done, self.call.session)
        yield event(f"response.{status}", seq, response=body)

    async def _keep(self, done: DoneEvent) -> None:
        if not self.req.store:
            return
        said = self.call.plan.messages[self.instructions:]
        await self.service.store.put(self.shape.id, ResponseRecord(
            agent=self.agent, session=self.call.session, instructions=self.req.instructions,
            messages=(*said, answer_message(done)),
        ))


def event(kind: str, seq: Iterator[int], **fields: Any) -> str:
    """One typed event, as ``event:`` and ``data:`` lines."""
    body = {"type": kind, "sequence_number": next(seq), **fields}
    return f"event: {kind}\n{sse(body)}"


class OutputEvents:
    """The output items of a streamed answer, as they open, grow and close."""

    def __init__(self, shape: ResponseShape, seq: Iterator[int], hides_calls: bool) -> None:
        self.shape = shape
        self.seq = seq
        self.items: list[dict[str, Any]] = []
        self.text: str | None = None  # the open message's text; None while none is open
        self._message_at = -1
        self._calls: dict[int, dict[str, Any]] = {}
        self._shown = ContentFilter(hides_calls=hides_calls)
        self._relay = ToolCallRelay()

    def feed(self, ev: TokenEvent | ToolCallEvent | DoneEvent) -> list[str]:
        """The events one turn event adds."""
        if isinstance(ev, TokenEvent):
            return self._text(self._shown.feed(ev.text))
        if isinstance(ev, ToolCallEvent):
            return self._call_deltas(self._relay.deltas(ev))
        lines = self._text(self._shown.flush()) + self._call_deltas(self._relay.rest(ev))
        if not self.items:  # an empty answer is still one (empty) message
            lines += self._open_message()
        return lines + self._close_message(self.shape.status(ev)) + self._close_calls(ev)

    def _emit(self, kind: str, **fields: Any) -> str:
        return event(kind, self.seq, **fields)

    def _open_message(self) -> list[str]:
        self.text, self._message_at = "", len(self.items)
        self.items.append(self.shape.message("", "in_progress"))
        where = {"item_id": self.shape.message_id, "output_index": self._message_at}
        return [self._emit("response.output_item.added", output_index=self._message_at,
                           item=self.shape.message("", "in_progress")),
                self._emit("response.content_part.added", **where, content_index=0,
                           part=_text_part(""))]

    def _text(self, text: str) -> list[str]:
        if not text:
            return []
        lines = self._open_message() if self.text is None else []
        self.text = (self.text or "") + text
        lines.append(self._emit("response.output_text.delta", item_id=self.shape.message_id,
                                output_index=self._message_at, content_index=0, delta=text,
                                logprobs=[]))
        return lines

    def _close_message(self, status: str) -> list[str]:
        if self.text is None:
            return []
        text, self.text = self.text, None
        item = self.items[self._message_at] = self.shape.message(text, status)
        where = {"item_id": self.shape.message_id, "output_index": self._message_at}
        return [
            self._emit("response.output_text.done", **where, content_index=0, text=text,
                       logprobs=[]),
            self._emit("response.content_part.done", **where, content_index=0,
                       part=_text_part(text)),
            self._emit("response.output_item.done", output_index=self._message_at, item=item),
        ]

    def _call_deltas(self, deltas: list[dict[str, Any]]) -> list[str]:
        lines: list[str] = []
        for d in deltas:
            item = self._calls.get(d["index"])
            if item is None:
                lines += self._close_message("completed")
                call_id = d.get("id") or f"call_{uuid.uuid4().hex[:24]}"
                name = d.get("function", {}).get("name") or ""
                item = self._calls[d["index"]] = call_item(call_id, name, "", "in_progress")
                item["output_index"] = len(self.items)
                self.items.append(item)
                lines.append(self._emit("response.output_item.added",
                                        output_index=item["output_index"], item=_public(item)))
            piece = d.get("function", {}).get("arguments", "")
            if piece:
                item["arguments"] += piece
                lines.append(self._emit("response.function_call_arguments.delta",
                                        item_id=item["id"], output_index=item["output_index"],
                                        delta=piece))
        return lines

    def _close_calls(self, done: DoneEvent) -> list[str]:
        final = {c.id: c.function.arguments for c in done.tool_calls}
        lines = []
        for item in self._calls.values():
            item["arguments"] = final.get(item["call_id"], item["arguments"])
            item["status"] = "completed"
            at = item.pop("output_index")
            self.items[at] = item
            lines += [self._emit("response.function_call_arguments.done", item_id=item["id"],
                                 output_index=at, arguments=item["arguments"]),
                      self._emit("response.output_item.done", output_index=at, item=item)]
        return lines


def _public(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "output_index"}
