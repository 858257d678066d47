"""Bad input at the OpenAI gateway: typed OpenAI errors, limits, and a gateway that keeps
serving — malformed and oversized bodies, slow headers, and a thousand connections at once."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from actors.gateway import Gateway, GatewaySettings, HttpLimits
from node.client import InfernodeClient
from node.streams import ensure_streams
from schemas.subjects import Subjects
from tests.helpers import EventCollector, publish_prompt, until

S = Subjects()
CHAT = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "temperature": 0}


async def _gateway_node(make_node, **settings):
    node = await make_node(openai_port=0, **settings)
    return node, f"http://127.0.0.1:{node.gateway.port}/v1"


def _error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [(b'{"messages": [', "body"),
     (b'{"messages": "hello"}', "messages"),
     (b'{"messages": [{"role": "robot", "content": "x"}]}', "messages.0.role"),
     (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}', "max_tokens"),
     (b'{"messages": [{"role": "user", "content": "x"}], "bogus_field": 1}', "bogus_field"),
     (b'{"messages": [{"role": "user", "content": "x"}], "n": 3}', "n")],
)
async def test_malformed_or_unknown_input_is_a_400_naming_the_field(make_node, body, param):
    """Broken JSON, wrong types and fields OpenAI does not document get 400 with the field."""
    _, base = await _gateway_node(make_node)
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{base}/chat/completions", content=body,
                            headers={"content-type": "application/json"})
    error = _error(r, 400)
    assert error["type"] == "invalid_request_error"
    assert param == "body" or error["param"] == param, error


async def test_documented_openai_extras_are_accepted_and_ignored(make_node):
    """Fields OpenAI clients send that change nothing here (user, store, ...) are accepted."""
    _, base = await _gateway_node(make_node)
    extras = {"user": "u1", "store": False, "frequency_penalty": 0.5, "presence_penalty": 0,
              "logit_bias": {"50256": -100}, "parallel_tool_calls": True, "n": 1,
              "logprobs": False, "service_tier": "auto", "tool_choice": "none",
              "stream_options": {"include_usage": True}, "max_completion_tokens": 2,
              "messages": [{"role": "developer", "content": "terse"},
                           {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{base}/chat/completions", json={**CHAT, **extras})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


async def test_routes_and_models_that_do_not_exist_are_openai_404s(make_node):
    """An unknown path or model id is a 404 error object; a wrong method a 405."""
    _, base = await _gateway_node(make_node)
    async with httpx.AsyncClient(timeout=30) as http:
        assert _error(await http.get(f"{base}/completions/legacy"), 404)["code"] == "not_found"
        assert _error(await http.get(f"{base}/models/gpt-4"), 404)["param"] == "model"
        _error(await http.get(f"{base}/chat/completions"), 405)


async def test_a_named_session_with_unrecorded_history_is_forked_not_appended_blindly(
    make_node, nc
):
    """A session that took prompts over NATS (not through a gateway) is not appended blindly:
    a call naming it is answered in a fork, and the session keeps only its own turn."""
    node, base = await _gateway_node(make_node)
    events = await EventCollector.start(nc, S.events_all("nats-made"))
    await publish_prompt(nc, "nats-made", "hello", max_tokens=2)
    await events.wait_until(lambda ms: any(m.subject.endswith(".commit") for m in ms))
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{base}/chat/completions", json=CHAT,
                            headers={"X-Session-Id": "nats-made"})
    assert r.status_code == 200, r.text
    assert r.headers["x-session-id"].startswith("nats-made-")
    async with InfernodeClient(node.url) as c:
        history = await c.history("nats-made")
    assert [r.content for r in history.records if r.kind == "user"] == ["hello"]
    assert history.generation == 1


async def test_a_history_longer_than_the_context_is_a_422(make_node):
    """A conversation that cannot fit the slot's context is context_overflow, 422."""
    _, base = await _gateway_node(make_node, n_ctx=64)
    body = {**CHAT, "messages": [{"role": "user", "content": "word " * 200}]}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{base}/chat/completions", json=body)
        assert _error(r, 422)["code"] == "context_overflow"
        assert (await http.post(f"{base}/chat/completions", json=CHAT)).status_code == 200


async def test_huge_bodies_are_refused_413_before_being_read(make_node):
    """A declared gigabyte is refused at once; a chunked body is cut at the limit."""
    node, base = await _gateway_node(make_node, openai_max_body_bytes=4096)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.gateway.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{")
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 10)
    assert status.startswith(b"HTTP/1.1 413"), status
    writer.close()

    async def chunks():
        for _ in range(64):
            yield b" " * 1024

    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{base}/chat/completions", content=chunks())
        assert _error(r, 413)["code"] == "too_large"
        assert (await http.post(f"{base}/chat/completions", json=CHAT)).status_code == 200


async def test_a_connection_dribbling_its_headers_is_closed_and_others_are_served(make_node):
    """Slow-loris: headers not finished within the timeout close the connection."""
    node, base = await _gateway_node(make_node, openai_header_timeout_s=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.gateway.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n")
    await writer.drain()
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.get(f"{base}/models")).status_code == 200
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the gateway
    writer.close()


async def test_requests_past_the_limit_get_429_and_held_ones_are_answered(
    nats_server, nc, make_node,
):
    """Eight calls wait for a node; 1,000 more at once get 429 with Retry-After; once a node
    starts the eight are answered and the gateway keeps serving."""
    await ensure_streams(nc.jetstream(), S, 1 << 20)
    settings = GatewaySettings(port=0, limits=HttpLimits(max_requests=8), turn_timeout_s=120,
                               model_name="m")
    async with Gateway(nc, S, settings) as gateway, httpx.AsyncClient(
        timeout=120, limits=httpx.Limits(max_connections=1100, max_keepalive_connections=0),
    ) as http:
        url = f"http://127.0.0.1:{gateway.port}/v1/chat/completions"
        held = [asyncio.ensure_future(http.post(url, json=CHAT)) for _ in range(8)]
        assert gateway.app is not None
        limit = gateway.app.asgi
        await until(lambda: limit.active == 8, timeout=30, what="eight calls in flight")
        burst = await asyncio.gather(*(http.get(url[: -len("/chat/completions")] + "/models")
                                       for _ in range(1000)))
        assert {r.status_code for r in burst} == {429}
        assert all(r.headers["retry-after"] == "1" for r in burst)
        assert _error(burst[0], 429)["type"] == "rate_limit_error"
        await make_node()
        answered = await asyncio.gather(*held)
        assert [r.status_code for r in answered] == [200] * 8
        assert (await http.post(url, json=CHAT)).status_code == 200


async def test_no_node_behind_the_gateway_is_a_503(nc):
    """Without a node (no intake stream), a call is refused 503 at once, with Retry-After."""
    async with Gateway(nc, S, GatewaySettings(port=0, model_name="m")) as gateway, \
            httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"http://127.0.0.1:{gateway.port}/v1/chat/completions", json=CHAT)
    assert _error(r, 503)["code"] == "unavailable" and r.headers["retry-after"]


def test_openai_sampling_fields_map_one_to_one_onto_the_prompt():
    """Temperature, top_p, top_k, penalties, seed, stop, max tokens and model reach the prompt."""
    from actors.gateway.wire import parse_request, prompt_for

    req = parse_request(b'{"model": "m1", "messages": [{"role": "user", "content": "x"}], '
                        b'"temperature": 0.3, "top_p": 0.5, "top_k": 7, "seed": 9, '
                        b'"frequency_penalty": 0.4, "presence_penalty": -0.2, "stop": "END", '
                        b'"max_completion_tokens": 33, "repeat_penalty": 1.3}')
    prompt = prompt_for(req, req.chat_messages(), "k" * 8, 2)
    s = prompt.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed) == (0.3, 0.5, 7, 9)
    assert (s.frequency_penalty, s.presence_penalty, s.repeat_penalty) == (0.4, -0.2, 1.3)
    assert prompt.stop == ("END",) and prompt.max_tokens == 33 and prompt.model == "m1"
    assert prompt.expect_generation == 2 and prompt.idempotency_key == "k" * 8


async def test_a_five_megabyte_tool_result_is_a_typed_error_and_the_gateway_serves_on(make_node):
    """A tool result of 5 MB is refused with a typed 4xx and a sentence, never a 500."""
    _, base = await _gateway_node(make_node)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": "call f"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "x" * (5 << 20)}]
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{base}/chat/completions", json={**CHAT, "messages": messages})
        assert r.status_code in (400, 413), r.text
        assert _error(r, r.status_code)["message"]
        assert (await http.post(f"{base}/chat/completions", json=CHAT)).status_code == 200
