"""OpenAI response shapes: completions, stream chunks, usage, errors.

Plain dicts in exactly the shape OpenAI documents, so the official SDKs parse them into
their own types; infernode's own facts (cache source, timings) ride along under ``infernode``
where SDKs ignore them.
"""

from __future__ import annotations

import json
import time
from typing import Any

from schemas.chat import ChatMessage, ToolCall
from schemas.errors import ErrorCode, InferError
from schemas.messages import DoneEvent

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    410: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls",
           "aborted": "stop", "error": "stop"}


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {
        "message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param,
        "code": code,
    }}


def infer_error_body(err: InferError) -> dict[str, Any]:
    """The error object of a typed infernode error."""
    param = err.details.get("param")
    return error_body(err.status, err.message, err.code.value,
                      str(param) if param is not None else None)


def retry_after(err: InferError) -> str | None:
    """``Retry-After`` seconds for a refusal a client should retry, else None."""
    if err.code in (ErrorCode.BUSY, ErrorCode.UNAVAILABLE):
        return str(int(err.details.get("retry_after_s", 1)))
    return None


def answer_message(done: DoneEvent) -> ChatMessage:
    """The assistant message a turn committed, as clients will send it back."""
    return ChatMessage(role="assistant", content=done.text, tool_calls=done.tool_calls or None)


def usage(done: DoneEvent) -> dict[str, Any]:
    """OpenAI usage, with the reused prefix in ``prompt_tokens_details.cached_tokens``, and
    what the context window left out of the history (infernode's ``dropped_tokens`` and
    ``dropped_turns``, also under ``prompt_tokens_details``)."""
    u = done.usage
    return {
        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens,
                                  "dropped_tokens": u.dropped_tokens},
        "dropped_tokens": u.dropped_tokens, "dropped_turns": u.dropped_turns,
    }


def tool_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """Tool calls in OpenAI's shape."""
    return [{"id": c.id, "type": "function", "function": {
        "name": c.function.name, "arguments": c.function.arguments}} for c in calls]


class CompletionShape:
    """Ids and names shared by every object of one completion."""

    def __init__(self, completion_id: str, model: str) -> None:
        self.id = completion_id
        self.model = model
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def completion(self, done: DoneEvent, session: str) -> dict[str, Any]:
        """A non-streamed ``chat.completion``."""
        message: dict[str, Any] = {"role": "assistant", "content": done.text}
        if done.tool_calls:
            message["tool_calls"] = tool_calls(done.tool_calls)
            message["content"] = done.text or None
        return {
            **self._head("chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _FINISH[done.finish_reason]}],
            "usage": usage(done),
            "infernode": _extras(done, session),
        }

    def chunk(
        self, delta: dict[str, Any], finish: str | None = None,
        usage_of: DoneEvent | None = None, empty: bool = False,
    ) -> str:
        """One ``chat.completion.chunk`` as an SSE ``data:`` line."""
        body = self._head("chat.completion.chunk")
        body["choices"] = [] if empty else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        ]
        if usage_of is not None:
            body["usage"] = usage(usage_of)
        return sse(body)

    def finish(self, done: DoneEvent) -> str:
        """The last choice chunk: an empty delta and the finish reason."""
        return self.chunk({}, _FINISH[done.finish_reason])


def sse(body: dict[str, Any]) -> str:
    """One server-sent event carrying ``body`` as JSON."""
    return f"data: {json.dumps(body, separators=(',', ':'), ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _extras(done: DoneEvent, session: str) -> dict[str, Any]:
    return {
        "session": session, "cache_source": done.cache.source,
        "miss_reason": done.cache.miss_reason, "ttft_ms": done.timings.ttft_ms,
    }
