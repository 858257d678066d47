"""The context window as the three HTTP doors show it: a prompt that cannot fit is a 422
before any byte of a stream, and what the window left out is counted in every API's usage."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

DOORS = ("chat", "responses", "messages")
PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses",
         "messages": "/v1/messages"}


def _body(door: str, messages: list[dict[str, str]], stream: bool) -> dict[str, Any]:
    if door == "chat":
        return {"model": "any", "messages": messages, "max_tokens": 4, "temperature": 0,
                "stream": stream}
    if door == "responses":
        return {"model": "any", "input": messages, "max_output_tokens": 4, "temperature": 0,
                "stream": stream}
    return {"model": "claude-any", "messages": messages, "max_tokens": 4, "temperature": 0,
            "stream": stream}


def _history(door: str, turns: int) -> list[dict[str, str]]:
    messages = []
    for n in range(turns):
        messages += [{"role": "user", "content": f"{door} question {n} about the weather"},
                     {"role": "assistant", "content": f"answer {n}"}]
    return [*messages, {"role": "user", "content": "and now the newest question"}]


def _error_code(door: str, body: dict[str, Any]) -> str:
    if door == "messages":
        assert body["type"] == "error"
        return body["error"]["type"]
    return body["error"]["code"]


@pytest.mark.parametrize("door", DOORS)
async def test_a_streamed_prompt_the_context_cannot_hold_is_a_422_before_the_stream(
    make_node, door
):
    """A streaming request whose newest message alone exceeds the context gets HTTP 422 in
    the door's error shape, as JSON, not an error event after a 200 stream opened."""
    node = await make_node(openai_port=0, n_ctx=64)
    base = f"http://127.0.0.1:{node.gateway.port}"
    too_long = [{"role": "user", "content": "word " * 200}]
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        async with http.stream("POST", PATHS[door], json=_body(door, too_long, True)) as r:
            raw = await r.aread()
        assert r.status_code == 422, raw[:300]
        assert r.headers["content-type"].startswith("application/json")
        expected = "invalid_request_error" if door == "messages" else "context_overflow"
        assert _error_code(door, r.json()) == expected
        ok = await http.post(PATHS[door], json=_body(door, [{"role": "user", "content": "hi"}],
                                                      True))
        assert ok.status_code == 200 and ok.headers["content-type"].startswith(
            "text/event-stream")


async def test_every_api_reports_the_tokens_the_window_left_out(make_node):
    """A history several times the context is answered with its oldest turns left out, and
    each API's usage says how many tokens that dropped: chat ``usage.dropped_tokens`` (and
    ``prompt_tokens_details.dropped_tokens``), Responses ``input_tokens_details
    .dropped_tokens``, Messages ``usage.dropped_input_tokens``."""
    node = await make_node(openai_port=0, n_ctx=256)
    base = f"http://127.0.0.1:{node.gateway.port}"
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        chat = (await http.post(PATHS["chat"], json=_body("chat", _history("chat", 20),
                                                          False))).json()["usage"]
        resp = (await http.post(PATHS["responses"], json=_body(
            "responses", _history("responses", 20), False))).json()["usage"]
        msgs = (await http.post(PATHS["messages"], json=_body(
            "messages", _history("messages", 20), False))).json()["usage"]
    assert chat["dropped_tokens"] > 0 and chat["dropped_turns"] > 0
    assert chat["prompt_tokens_details"]["dropped_tokens"] == chat["dropped_tokens"]
    assert chat["prompt_tokens"] + 4 <= 256
    assert resp["input_tokens_details"]["dropped_tokens"] > 0
    assert resp["input_tokens_details"]["dropped_turns"] > 0
    assert msgs["dropped_input_tokens"] > 0 and msgs["dropped_turns"] > 0
