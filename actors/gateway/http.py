"""The HTTP face of the gateway: a Starlette app with OpenAI's and Anthropic's routes.

Starlette parses HTTP (through uvicorn); this module only decides. Every refusal is an
OpenAI error object (on the Messages routes, an Anthropic one) with the matching status; a
request is never read past the body limit, and past the concurrency limit a request is
answered 429 before anything else is done.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from actors.gateway.anthropic_shapes import MessageShape
from actors.gateway.anthropic_shapes import error_body as anthropic_error
from actors.gateway.anthropic_wire import parse_count, parse_messages, to_chat_request
from actors.gateway.calls import ChatService, OpenCall
from actors.gateway.idempotency import request_digest
from actors.gateway.responses import (
    SSE_DONE,
    CompletionShape,
    error_body,
    infer_error_body,
    retry_after,
    sse,
)
from actors.gateway.responses_api import ResponsesService
from actors.gateway.sessions import affinity_hint
from actors.gateway.wire import parse_request
from schemas.errors import ErrorCode, InferError
from schemas.gateway import IdempotencyEntry

log = structlog.get_logger("gateway")

SESSION_HEADER = "X-Session-Id"
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True)
class HttpLimits:
    """What one gateway accepts."""

    max_body_bytes: int = 8 << 20
    """Largest request body; larger ones get 413 without being read."""
    max_requests: int = 256
    """Requests handled at once; more get 429 with ``Retry-After``."""


class Unauthorized(Exception):
    """No valid bearer key (only raised when the gateway has keys)."""


class GatewayApp:
    """Routes, auth and limits around a ``ChatService``."""

    def __init__(
        self, service: ChatService, api_keys: dict[str, str], limits: HttpLimits
    ) -> None:
        self.service = service
        self.api_keys = api_keys
        self.limits = limits
        self.responses_api = ResponsesService(service)
        self.asgi: ASGIApp = RequestLimit(self._starlette(), limits.max_requests)

    def _starlette(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/responses", self.responses, methods=["POST"]),
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            ],
            exception_handlers={
                InferError: _infer_error, HTTPException: _http_error,
                Unauthorized: _unauthorized, ClientDisconnect: _gone,
                Exception: _internal_error,
            },
        )

    # -- routes ---------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        """The loaded model (OpenAI's ``list`` of one)."""
        self._agent(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        """One model by id; 404 for any other."""
        self._agent(request)
        if request.path_params["model"] != self.service.model:
            raise InferError(ErrorCode.UNKNOWN_SESSION, f"model {request.path_params['model']!r}"
                             f" is not served here; this node serves {self.service.model!r}",
                             {"param": "model"})
        return JSONResponse(self._model_card())

    async def chat(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        agent = self._agent(request)
        req = parse_request(await self._body(request))
        hint = affinity_hint(request.headers, req.session_hint())
        key = request.headers.get(IDEMPOTENCY_HEADER)
        claim = None
        if key is not None:
            held = await self.service.claim(agent, key, request_digest(req, hint))
            if isinstance(held, IdempotencyEntry):
                assert held.completion is not None and held.session is not None
                return _replay(held.completion, held.session, req.stream)
            claim = held
        call = await self.service.open(agent, req, hint, claim)
        headers = {SESSION_HEADER: call.session}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            await _first_event(request, call)
            return EventStreamResponse(_guarded(call, include_usage), headers=headers)
        body = await _complete_unless_gone(request, call.complete(), call.plan.session)
        return JSONResponse(body, headers=headers)

    async def responses(self, request: Request) -> Response:
        """``POST /v1/responses`` (OpenAI's Responses API)."""
        agent = self._agent(request)
        run = await self.responses_api.open(agent, await self._body(request), request.headers)
        headers = {SESSION_HEADER: run.call.session}
        if run.req.stream:
            await _first_event(request, run.call)
            return EventStreamResponse(run.stream(), headers=headers)
        body = await _complete_unless_gone(request, run.complete(), run.call.plan.session)
        return JSONResponse(body, headers=headers)

    async def messages(self, request: Request) -> Response:
        """``POST /v1/messages`` (Anthropic's Messages API)."""
        return await _anthropic_errors(self._messages(request))

    async def _messages(self, request: Request) -> Response:
        agent = self._agent(request)
        req = parse_messages(await self._body(request))
        hint = affinity_hint(request.headers, req.metadata.user_id if req.metadata else None)
        call = await self.service.open(agent, to_chat_request(req), hint, None)
        shape = MessageShape(f"msg_{uuid.uuid4().hex}", req.model)
        headers = {SESSION_HEADER: call.session}
        if req.stream:
            await _first_event(request, call)
            return EventStreamResponse(shape.stream(call), headers=headers)

        async def answer() -> dict[str, Any]:
            await call.complete()
            assert call.done is not None
            return shape.message(call.done)

        body = await _complete_unless_gone(request, answer(), call.plan.session)
        return JSONResponse(body, headers=headers)

    async def count_tokens(self, request: Request) -> Response:
        """``POST /v1/messages/count_tokens``: the prompt's tokens, counted by a node."""

        async def count() -> Response:
            self._agent(request)
            req = to_chat_request(parse_count(await self._body(request)))
            return JSONResponse({"input_tokens": await self.service.count_tokens(req)})

        return await _anthropic_errors(count())

    # -- helpers --------------------------------------------------------------------------
    def _model_card(self) -> dict[str, Any]:
        return {"id": self.service.model, "object": "model", "created": 0,
                "owned_by": "infernode"}

    def _agent(self, request: Request) -> str:
        """The agent a bearer key belongs to ('' when the gateway has no keys)."""
        if not self.api_keys:
            return ""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":  # Anthropic's clients send the key as x-api-key
            token = request.headers.get("x-api-key", "")
        agent = self.api_keys.get(token.strip())
        if agent is None:
            raise Unauthorized()
        return agent

    async def _body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise _too_large(limit) if declared.isdigit() else InferError(
                ErrorCode.BAD_REQUEST, "Content-Length is not a number")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop the moment the client goes away.

    Starlette only notices a vanished client when a write fails, which may be long after
    (a turn waiting for a slot writes nothing); listening for ``http.disconnect`` cancels
    the stream, and with it the turn, at once.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str]) -> None:
        super().__init__(content, headers={**headers, "Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def stream_then_stop() -> None:
                await self.stream_response(send)
                tg.cancel_scope.cancel()

            tg.start_soon(stream_then_stop)
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()


class RequestLimit:
    """ASGI middleware: at most ``limit`` requests at once, 429 with Retry-After past it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.active = 0
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            self.refused += 1
            message = "too many requests at once; retry shortly"
            response = (
                JSONResponse(anthropic_error(429, message), 429, headers={"Retry-After": "1"})
                if _is_messages(scope["path"])
                else _error_response(429, message, ErrorCode.BUSY.value, retry="1")
            )
            await response(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


async def _guarded(call: OpenCall, include_usage: bool) -> AsyncIterator[str]:
    """The call's stream; a failure after the first byte becomes an SSE error event."""
    try:
        async for line in call.stream(include_usage):
            yield line
    except InferError as e:
        yield sse(infer_error_body(e))
        yield SSE_DONE


async def _first_event(request: Request, call: OpenCall) -> None:
    """Before a stream's first byte, its turn's first event, or the node's refusal raised:
    a prompt the context cannot hold is then a 422 in the door's own error shape."""

    async def first() -> dict[str, Any]:
        await call.opened()
        return {}

    await _complete_unless_gone(request, first(), call.plan.session)


async def _complete_unless_gone(
    request: Request, complete: Coroutine[Any, Any, dict[str, Any]], session: str
) -> dict[str, Any]:
    """The answer ``complete`` gives, or its call cancelled when the client goes away."""
    answer = asyncio.ensure_future(complete)
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not answer.done():
        log.info("gateway_client_gone", session=session)
        answer.cancel()  # the call's cleanup aborts the turn
        await asyncio.gather(answer, return_exceptions=True)
        raise ClientDisconnect()
    return answer.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _replay(completion: str, session: str, stream: bool) -> Response:
    """A kept answer, given again to a retried request (as a stream when asked)."""
    headers = {SESSION_HEADER: session}
    body = json.loads(completion)
    if not stream:
        return JSONResponse(body, headers=headers)
    shape = CompletionShape(body["id"], body["model"])
    choice = body["choices"][0]
    delta = {k: v for k, v in choice["message"].items() if v is not None}
    if "tool_calls" in delta:  # stream deltas number their calls
        delta["tool_calls"] = [{**c, "index": i} for i, c in enumerate(delta["tool_calls"])]

    async def lines() -> AsyncIterator[str]:
        yield shape.chunk(delta)
        yield shape.chunk({}, choice["finish_reason"])
        yield SSE_DONE

    return EventStreamResponse(lines(), headers=headers)


async def _anthropic_errors(work: Coroutine[Any, Any, Response]) -> Response:
    """The response of ``work``, or its failure as Anthropic's error object."""
    try:
        return await work
    except InferError as e:
        retry = retry_after(e)
        return JSONResponse(anthropic_error(e.status, e.message), e.status,
                            headers={"Retry-After": retry} if retry else None)
    except Unauthorized:
        return JSONResponse(anthropic_error(401, "a valid API key is required: send "
                                            "`x-api-key: <key>`"), 401)
    except ClientDisconnect:
        raise
    except Exception as e:
        log.error("gateway_request_failed", error=repr(e), path="/v1/messages")
        return JSONResponse(anthropic_error(500, f"the gateway failed: {type(e).__name__}"),
                            500)


def _too_large(limit: int) -> InferError:
    return InferError(ErrorCode.TOO_LARGE,
                      f"the request body is larger than {limit} bytes; send less")


def _error_response(
    status: int, message: str, code: str, param: str | None = None, retry: str | None = None
) -> JSONResponse:
    headers = {"Retry-After": retry} if retry is not None else None
    return JSONResponse(error_body(status, message, code, param), status, headers=headers)


async def _infer_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InferError)
    body = infer_error_body(exc)
    retry = retry_after(exc)
    return JSONResponse(body, exc.status, headers={"Retry-After": retry} if retry else None)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    if _is_messages(request.url.path):
        return JSONResponse(anthropic_error(exc.status_code, message), exc.status_code)
    return _error_response(exc.status_code, message, code)


def _is_messages(path: str) -> bool:
    """Whether ``path`` is one of Anthropic's routes (whose clients read its error shape)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


async def _unauthorized(request: Request, exc: Exception) -> Response:
    return _error_response(401, "a valid API key is required: send `Authorization: Bearer "
                           "<key>`", "invalid_api_key")


async def _gone(request: Request, exc: Exception) -> Response:
    # Nobody reads this; uvicorn needs a response to close the exchange.
    return Response(status_code=499)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("gateway_request_failed", error=repr(exc), path=request.url.path)
    return _error_response(500, f"the gateway failed: {type(exc).__name__}",
                           ErrorCode.INTERNAL.value)
