"""``Idempotency-Key`` at the OpenAI gateway: one turn per key under any concurrency, on one
gateway or several in front of one node; the same key with another body is a 422 naming the
key; a key whose first request failed before it was answered can be used again."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai

from actors.gateway import Gateway, GatewaySettings
from actors.gateway.chain import ConversationIndex
from actors.gateway.idempotency import Claim, KeyClaims
from schemas.subjects import Subjects
from tests.helpers import EventCollector

S = Subjects()
CHAT = {"model": "any", "max_tokens": 4, "temperature": 1.0}


def _client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def test_five_concurrent_requests_with_one_key_on_two_gateways_run_one_turn(
    make_node, nc,
):
    """Five requests at once with one key (three on one gateway, two on another) get one
    answer, and the node runs and records exactly one turn."""
    node = await make_node(openai_port=0)
    commits = await EventCollector.start(nc, S.events("*", "commit"))
    starts = await EventCollector.start(nc, S.events("*", "started"))
    async with Gateway(nc, S, GatewaySettings(port=0, model_name="m")) as other:
        bases = [f"http://127.0.0.1:{node.gateway.port}/v1"] * 3 + [
            f"http://127.0.0.1:{other.port}/v1"] * 2
        head = {"Idempotency-Key": "one-turn-please"}
        raws = await asyncio.gather(*(
            _client(b).chat.completions.with_raw_response.create(
                messages=_user("tell me a story"), extra_headers=head, **CHAT)
            for b in bases
        ))
    answers = [r.parse() for r in raws]
    assert len({a.id for a in answers}) == 1, [a.id for a in answers]
    assert len({a.choices[0].message.content for a in answers}) == 1
    assert len({r.headers["x-session-id"] for r in raws}) == 1
    later = await _client(bases[0]).chat.completions.with_raw_response.create(
        messages=_user("a later, unrelated call"), **CHAT)  # its commit comes after the key's
    later_commit = S.events(later.headers["x-session-id"], "commit")
    await commits.wait_until(lambda ms: any(m.subject == later_commit for m in ms))
    assert len(commits.messages) == 2 and len(starts.messages) == 2, (
        f"the key ran {len(starts.messages) - 1} turns")

async def test_the_same_key_with_another_body_is_a_422_naming_the_key(make_node):
    """A key reused with different messages is refused 422 with a sentence naming the key;
    the same body again (streamed or not) still gets the kept answer."""
    node = await make_node(openai_port=0)
    base = f"http://127.0.0.1:{node.gateway.port}/v1"
    head = {"Idempotency-Key": "reused-key-7"}
    first = await _client(base).chat.completions.create(
        messages=_user("first body"), extra_headers=head, **CHAT)
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{base}/chat/completions", headers=head,
                            json={**CHAT, "messages": _user("another body")})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert "reused-key-7" in error["message"] and error["type"] == "invalid_request_error"
        assert error["code"] == "idempotency_mismatch"
        same = await http.post(f"{base}/chat/completions", headers=head,
                               json={**CHAT, "messages": _user("first body")})
    assert same.status_code == 200 and same.json()["id"] == first.id


async def test_a_key_whose_request_failed_unanswered_is_free_for_a_retry(make_node, nc):
    """A request refused before its turn (no node yet: 503) keeps no claim on its key: the
    retry with the same key, once a node runs, is answered."""
    async with Gateway(nc, S, GatewaySettings(port=0, model_name="m")) as gateway, \
            httpx.AsyncClient(timeout=60) as http:
        url = f"http://127.0.0.1:{gateway.port}/v1/chat/completions"
        body, head = {**CHAT, "messages": _user("hello")}, {"Idempotency-Key": "after-503"}
        assert (await http.post(url, json=body, headers=head)).status_code == 503
        await make_node()
        r = await http.post(url, json=body, headers=head)
        assert r.status_code == 200, r.text


async def _waiting_on(nc, bucket: str, watchers: int) -> None:
    """Until the answers bucket has ``watchers`` consumers (a waiter watching its key)."""
    js = nc.jetstream()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while (await js.stream_info(S.kv_stream(bucket))).state.consumer_count < watchers:
        assert loop.time() < deadline, "no request waited on the key"


async def test_a_released_claim_wakes_a_waiting_request_which_owns_the_key(nats_server, nc):
    """A request waiting on a claimed key owns it the moment the claim is released (its
    turn failed unanswered), not when the claim would have expired."""
    index = await ConversationIndex.open(nc.jetstream(), S)
    claims, key, body = KeyClaims(index.answers, hold_s=60), "a" * 64, "b" * 64
    first = await claims.claim(key, body, "shown")
    assert isinstance(first, Claim)
    waiter = asyncio.ensure_future(claims.claim(key, body, "shown"))
    await _waiting_on(nc, S.gateway_answers_bucket, 1)
    await claims.release(first)
    second = await asyncio.wait_for(waiter, 5)
    assert isinstance(second, Claim) and second.revision > first.revision


async def test_a_claim_its_gateway_never_answered_is_taken_over_once_it_expires(nats_server, nc):
    """A claim left by a gateway that died holds its key until its claimed_until only; the
    request waiting on it then owns the key."""
    index = await ConversationIndex.open(nc.jetstream(), S)
    key, body = "c" * 64, "d" * 64
    dead = await KeyClaims(index.answers, hold_s=0.5).claim(key, body, "shown")
    assert isinstance(dead, Claim)
    started = time.monotonic()
    taken = await KeyClaims(index.answers, hold_s=60).claim(key, body, "shown")
    assert isinstance(taken, Claim) and taken.revision > dead.revision
    assert time.monotonic() - started < 5
