"""Deeply nested JSON at every door that parses it: the gateway's HTTP body, a prompt on the
prompt subject, an ask. Each is a 400 naming the limit (128 levels), never a 500 or a
``RecursionError``, and the node serves the next request."""

from __future__ import annotations

import json

import httpx
import pytest

from schemas.json_depth import MAX_JSON_DEPTH, json_depth
from schemas.subjects import ERROR_HEADER, Subjects
from tests.helpers import EventCollector, publish_prompt

S = Subjects()
CHAT = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "temperature": 0}


def nested(depth: int) -> str:
    """A JSON value nesting ``depth`` levels (objects in arrays in objects...)."""
    return '[{"a":' * (depth // 2) + "1" + "}]" * (depth // 2)


def chat_with_nesting(depth: int) -> bytes:
    """A chat body in which a tool's parameters nest ``depth`` levels."""
    tool = '{"type":"function","function":{"name":"f","parameters":{"x":' + nested(depth) + "}}}"
    return ('{"messages":[{"role":"user","content":"x"}],"tools":[' + tool + "]}").encode()


def deep_prompt(depth: int) -> bytes:
    """A prompt whose ``tools`` nest ``depth`` levels."""
    return ('{"messages": [{"role": "user", "content": "x"}], "tools": ['
            + nested(depth) + "]}").encode()


def test_depth_counts_nesting_outside_strings_only():
    """Brackets inside strings (escaped quotes included) are text, not nesting."""
    assert json_depth(b'{"a":"[[[{{", "b":[{"c":"\\"]]"}]}') == 3
    assert json_depth(nested(10_000).encode()) == 10_000
    assert json_depth(b'"no brackets"') == 0


@pytest.mark.parametrize("depth", [1_000, 10_000])
async def test_deeply_nested_http_bodies_get_a_400_naming_the_limit(make_node, depth):
    """A body nesting 1,000 or 10,000 levels is a 400 naming the limit; the next call is
    answered."""
    node = await make_node(openai_port=0)
    url = f"http://127.0.0.1:{node.gateway.port}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(url, content=chat_with_nesting(depth),
                            headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert f"more than {MAX_JSON_DEPTH} levels" in r.json()["error"]["message"]
        assert (await http.post(url, json=CHAT)).status_code == 200


async def test_a_deeply_nested_prompt_on_the_prompt_subject_is_a_400_naming_the_limit(
    make_node, nc,
):
    """A prompt nesting 10,000 levels gets one bad_request error event; the session serves
    the next prompt."""
    await make_node()
    events = await EventCollector.start(nc, S.events_all("deep"))
    await nc.jetstream().publish(S.prompt("deep"), deep_prompt(10_000))
    (error,) = await events.wait_until(
        lambda ms: [m for m in ms if m.subject.endswith(".error")])
    event = json.loads(error.data)
    assert event["status"] == 400 and f"more than {MAX_JSON_DEPTH} levels" in event["message"]
    await publish_prompt(nc, "deep", "hello")
    await events.wait_until(lambda ms: any(m.subject.endswith(".commit") for m in ms))


async def test_a_deeply_nested_ask_is_a_400_naming_the_limit(make_node, nc):
    """An ask nesting 10,000 levels is answered with a bad_request error; the next ask is
    answered."""
    await make_node()
    reply = await nc.request(S.ask("deep-ask"), deep_prompt(10_000), timeout=30)
    assert reply.headers and reply.headers[ERROR_HEADER] == "bad_request", reply.data
    assert f"more than {MAX_JSON_DEPTH} levels" in json.loads(reply.data)["message"]
    answer = await nc.request(S.ask("deep-ask"), b"Hello", timeout=60)
    assert not (answer.headers and ERROR_HEADER in answer.headers), answer.data
