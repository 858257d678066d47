"""A long prefill's progress: ``prompt_progress`` events on the session's events subject, and
SSE comments on every HTTP door's streams (read raw with httpx, and through the official SDKs,
which skip them); non-streamed answers are unchanged."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest

from actors.engine import decode as decode_mod
from schemas.messages import PromptProgressEvent
from schemas.subjects import EventKind, Subjects
from tests.helpers import EventCollector

S = Subjects()
CHUNK = 64
def long_text(seed: int) -> str:
    """About 750 prompt tokens on the tiny model (a dozen chunks of ``CHUNK``), sharing no
    prefix with another seed's, so no request reuses another's cached prompt."""
    return " ".join(f"w{seed}x{i % 97}" for i in range(150))


LONG = long_text(0)
COMMENT = ": prompt_progress "


@pytest.fixture
def every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress is due after every chunk (the node runs in this process)."""
    monkeypatch.setattr(decode_mod, "PROGRESS_EVERY_S", 0.0)


async def _base(make_node) -> str:
    node = await make_node(openai_port=0, n_batch=CHUNK)
    return f"http://127.0.0.1:{node.gateway.port}"


async def _raw_stream(url: str, body: dict[str, Any]) -> list[str]:
    async with httpx.AsyncClient(timeout=60) as http, http.stream(
        "POST", url, json=body, headers={"x-api-key": "unused"}
    ) as r:
        assert r.status_code == 200, await r.aread()
        return [line async for line in r.aiter_lines()]


def _progress(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(x[len(COMMENT):]) for x in lines if x.startswith(COMMENT)]


async def test_a_long_prefill_is_published_as_prompt_progress_events_and_sse_comments(
    make_node, nc, every_chunk
):
    """A streamed chat completion over a long prompt carries ``: prompt_progress`` comments
    before its first text, each matching a ``prompt_progress`` event the node published."""
    base = await _base(make_node)
    events = await EventCollector.start(nc, S.events("*", EventKind.PROMPT_PROGRESS))
    lines = await _raw_stream(f"{base}/v1/chat/completions", {
        "model": "any", "messages": [{"role": "user", "content": LONG}], "stream": True,
        "max_tokens": 4, "temperature": 0,
    })
    shown = _progress(lines)
    assert len(shown) >= 5, lines[:20]
    total = shown[0]["total"]
    assert [p["done"] for p in shown] == [CHUNK * (i + 1) for i in range(len(shown))]
    assert all(p["total"] == total and p["done"] < total for p in shown)
    last_comment = max(i for i, x in enumerate(lines) if x.startswith(COMMENT))
    first_text = next(i for i, x in enumerate(lines)
                      if x.startswith("data: {") and '"content":""' not in x)
    assert last_comment < first_text
    published = await events.wait_until(lambda m: len(m) >= len(shown))
    bodies = [PromptProgressEvent.model_validate_json(m.data) for m in published]
    assert [b.done for b in bodies] == [p["done"] for p in shown]
    assert len({b.turn_id for b in bodies}) == 1


async def test_every_streaming_door_sends_progress_comments_that_the_sdks_skip(
    make_node, every_chunk
):
    """The Responses and Messages streams carry the comments too; the openai and anthropic
    SDKs read every stream through them, and a non-streamed answer is the same text."""
    base = await _base(make_node)
    responses = await _raw_stream(f"{base}/v1/responses", {
        "model": "any", "input": long_text(1), "stream": True, "max_output_tokens": 4,
        "temperature": 0,
    })
    messages = await _raw_stream(f"{base}/v1/messages", {
        "model": "any", "messages": [{"role": "user", "content": long_text(2)}],
        "stream": True, "max_tokens": 4, "temperature": 0,
    })
    user = [{"role": "user", "content": LONG}]
    assert _progress(responses) and _progress(messages)
    chat = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    stream = await chat.chat.completions.create(
        model="any", messages=user, stream=True, max_tokens=4, temperature=0)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    whole = await chat.chat.completions.create(
        model="any", messages=user, max_tokens=4, temperature=0)
    assert streamed and whole.choices[0].message.content == streamed
    claude = anthropic.AsyncAnthropic(base_url=base, api_key="unused", max_retries=0)
    events = await claude.messages.create(
        model="any", messages=user, max_tokens=4, stream=True)  # type: ignore[arg-type]
    kinds = [e.type async for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds
