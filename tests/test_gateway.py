"""The OpenAI gateway with the official `openai` SDK: answers, streams, sessions, forks,
idempotent retries, disconnects and API keys, on the real engine and the tiny model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from actors.gateway import Gateway, GatewayBindError, GatewaySettings
from node.client import InfernodeClient
from node.config import ConfigError, NodeConfig
from node.wiring import gateway_settings
from schemas.subjects import Subjects
from tests.helpers import EventCollector

S = Subjects()
GREEDY = {"temperature": 0, "max_tokens": 6}


async def _gateway_node(make_node, **settings):
    node = await make_node(openai_port=0, **settings)
    return node, f"http://127.0.0.1:{node.gateway.port}/v1"


def _client(base: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0)


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


async def _history(url: str, session: str):
    async with InfernodeClient(url) as c:
        return await c.history(session)


async def test_sync_sdk_answers_non_streamed_and_lists_the_model(make_node):
    """The synchronous SDK gets a chat.completion with usage and sees the model listed."""
    node, base = await _gateway_node(make_node)

    def call() -> tuple[object, object]:
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        models = client.models.list()
        answer = client.chat.completions.create(model="any", messages=[_user("hi")], **GREEDY)
        return models, answer

    models, answer = await asyncio.to_thread(call)
    assert [m.id for m in models.data] == [node.config.model.stem]
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 6 and answer.usage.prompt_tokens > 0


async def test_async_sdk_streams_deltas_a_finish_reason_and_usage(make_node):
    """A streamed answer is role, content deltas, a finish reason, then a usage chunk."""
    _, base = await _gateway_node(make_node)
    stream = await _client(base).chat.completions.create(
        model="any", messages=[_user("hi")], stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text and finishes[-1] == "length" and finishes.count("length") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    again = await _client(base).chat.completions.create(
        model="any", messages=[_user("hi")], **GREEDY)
    assert again.choices[0].message.content == text  # greedy: the same text either way


async def test_stateless_client_reuses_everything_before_its_new_message_for_six_turns(
    make_node,
):
    """Turns 2-6 of a stateless conversation each reuse all tokens of the turns before."""
    _, base = await _gateway_node(make_node)
    client, messages, previous, sessions = _client(base), [], None, set()
    for turn in range(6):
        messages.append(_user(f"question number {turn}"))
        raw = await client.chat.completions.with_raw_response.create(
            model="any", messages=messages, **GREEDY)
        answer = raw.parse()
        sessions.add(raw.headers["x-session-id"])
        usage = answer.usage
        if previous is not None:
            reusable = previous.prompt_tokens + previous.completion_tokens
            assert usage.prompt_tokens_details.cached_tokens == reusable, (turn, usage)
        previous = usage
        messages.append(answer.choices[0].message.model_dump(exclude_none=True))
    assert len(sessions) == 1


async def test_named_session_sends_only_messages_the_session_has_not_seen(make_node):
    """With X-Session-Id (or metadata.session_id) the node records each message once."""
    node, base = await _gateway_node(make_node)
    client = _client(base)
    messages = [_user("one")]
    first = await client.chat.completions.create(
        model="any", messages=messages, extra_headers={"X-Session-Id": "mine"}, **GREEDY)
    messages += [first.choices[0].message.model_dump(exclude_none=True), _user("two")]
    second = await client.chat.completions.create(
        model="any", messages=messages, metadata={"session_id": "mine"}, **GREEDY)
    history = await _history(node.url, "mine")
    users = [r.content for r in history.records if r.kind == "user"]
    assert users == ["one", "two"] and history.generation == 2
    assert second.usage.prompt_tokens_details.cached_tokens == (
        first.usage.prompt_tokens + first.usage.completion_tokens)


async def test_edited_history_forks_a_session_restored_up_to_the_divergence(make_node):
    """Editing an earlier message forks: a new session id, its prefix restored, the old kept
    (without API keys every session is its own trust domain: this one-user node declares them
    all one share group)."""
    node, base = await _gateway_node(make_node, bank_share_groups="local=*")
    client = _client(base)
    head = {"X-Session-Id": "editme"}
    messages = [{"role": "system", "content": "You are terse. " * 8}, _user("first")]
    one = await client.chat.completions.create(model="any", messages=messages,
                                               extra_headers=head, **GREEDY)
    messages += [one.choices[0].message.model_dump(exclude_none=True), _user("second")]
    await client.chat.completions.create(model="any", messages=messages, extra_headers=head,
                                         **GREEDY)
    edited = messages[:3] + [_user("second, edited")]
    raw = await client.chat.completions.with_raw_response.create(
        model="any", messages=edited, extra_headers=head, **GREEDY)
    fork = raw.headers["x-session-id"]
    assert fork != "editme" and fork.startswith("editme-")
    reused = raw.parse().usage.prompt_tokens_details.cached_tokens
    assert reused >= one.usage.prompt_tokens + one.usage.completion_tokens
    assert (await _history(node.url, "editme")).generation == 2
    assert (await _history(node.url, fork)).generation == 1


async def test_a_stateless_call_rewriting_its_last_message_restores_the_history_before_it(
    make_node,
):
    """Without API keys or share groups, a stateless call whose last user message was
    rewritten (aider moves its reminder) forks into the keyless calls' one trust domain and
    restores everything before that message from the bank."""
    node, base = await _gateway_node(make_node)
    client = _client(base)
    history = [{"role": "system", "content": "You edit code. Reply with a diff. " * 12}]
    first = await client.chat.completions.create(
        model="any", messages=[*history, _user("add a test\n\nReply in the diff format.")],
        **GREEDY)
    raw = await client.chat.completions.with_raw_response.create(
        model="any", messages=[*history, _user("add a test"), _user("now run it")], **GREEDY)
    reused = raw.parse().usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens * 0.8 <= reused < raw.parse().usage.prompt_tokens
    assert raw.headers["x-session-id"].startswith("chat_")


async def test_a_second_gateway_continues_a_conversation_the_first_one_started(make_node, nc):
    """The conversation index lives in JetStream KV: another gateway (or a restart) finds it."""
    node, base = await _gateway_node(make_node)
    messages = [_user("hello there")]
    one = await _client(base).chat.completions.create(model="any", messages=messages, **GREEDY)
    messages += [one.choices[0].message.model_dump(exclude_none=True), _user("and then")]
    async with Gateway(nc, S, GatewaySettings(port=0)) as other:
        raw = await _client(f"http://127.0.0.1:{other.port}/v1").chat.completions \
            .with_raw_response.create(model="any", messages=messages, **GREEDY)
    assert raw.headers["x-session-id"] == one.infernode["session"]  # type: ignore[attr-defined]
    assert raw.parse().usage.prompt_tokens_details.cached_tokens == (
        one.usage.prompt_tokens + one.usage.completion_tokens)


async def test_client_leaving_mid_stream_aborts_the_turn(make_node, nc):
    """Closing the stream after the first token aborts the turn; history says ABORTED."""
    node, base = await _gateway_node(make_node)
    events = await EventCollector.start(nc, S.events_all("leaver"))
    body = {"model": "any", "messages": [_user("talk")], "max_tokens": 4000,
            "temperature": 0, "stream": True}
    async with httpx.AsyncClient(timeout=30) as http, http.stream(
        "POST", f"{base}/chat/completions", json=body, headers={"X-Session-Id": "leaver"}
    ) as response:
        async for line in response.aiter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # a token arrived: leave
    await events.wait_until(lambda ms: any(m.subject.endswith(".aborted") for m in ms))
    history = await _history(node.url, "leaver")
    assert [r.status for r in history.records if r.kind == "provisional"] == ["ABORTED"]
    assert history.generation == 0


async def test_client_leaving_before_a_non_streamed_answer_aborts_the_turn(make_node, nc):
    """A non-streamed call whose client goes away once tokens flow aborts the turn too."""
    node, base = await _gateway_node(make_node)
    events = await EventCollector.start(nc, S.events_all("quitter"))
    body = {"model": "any", "messages": [_user("talk")], "max_tokens": 4000, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as http:
        call = asyncio.ensure_future(http.post(f"{base}/chat/completions", json=body,
                                               headers={"X-Session-Id": "quitter"}))
        await events.wait_until(lambda ms: any(m.subject.endswith(".token") for m in ms))
        call.cancel()  # httpx closes the connection
        await asyncio.gather(call, return_exceptions=True)
    await events.wait_until(lambda ms: any(m.subject.endswith(".aborted") for m in ms))
    assert (await _history(node.url, "quitter")).generation == 0


async def test_retries_with_one_idempotency_key_are_answered_once(make_node):
    """A retried request with the same Idempotency-Key gets the same answer, one turn."""
    node, base = await _gateway_node(make_node)
    client = _client(base)
    head = {"Idempotency-Key": "retry-me-1", "X-Session-Id": "idem"}
    first = await client.chat.completions.create(model="any", messages=[_user("once")],
                                                 extra_headers=head, **GREEDY)
    again = await client.chat.completions.create(model="any", messages=[_user("once")],
                                                 extra_headers=head, **GREEDY)
    streamed = await client.chat.completions.create(
        model="any", messages=[_user("once")], extra_headers=head, stream=True, **GREEDY)
    text = "".join([c.choices[0].delta.content or "" async for c in streamed])
    assert again.id == first.id and again.choices[0].message.content == text
    history = await _history(node.url, "idem")
    assert [r.content for r in history.records if r.kind == "user"] == ["once"]
    assert history.generation == 1


async def test_each_api_key_sees_only_its_own_sessions(make_node, tmp_path: Path):
    """Keys map to agents: same session id, two sessions; a stateless call never crosses."""
    keys = tmp_path / "keys"
    keys.write_text("alice-key-0123456789 alice\nbob-key-0123456789ab bob  # comment\n")
    node, base = await _gateway_node(make_node, api_keys=keys)
    with pytest.raises(openai.AuthenticationError):
        await _client(base, "wrong-key").models.list()
    alice, bob = _client(base, "alice-key-0123456789"), _client(base, "bob-key-0123456789ab")
    head = {"X-Session-Id": "shared-name"}
    await alice.chat.completions.create(model="any", messages=[_user("a")], extra_headers=head,
                                        **GREEDY)
    await bob.chat.completions.create(model="any", messages=[_user("b")], extra_headers=head,
                                      **GREEDY)
    assert [r.content for r in (await _history(node.url, "alice_shared-name")).records
            if r.kind == "user"] == ["a"]
    assert [r.content for r in (await _history(node.url, "bob_shared-name")).records
            if r.kind == "user"] == ["b"]
    one = await alice.chat.completions.create(model="any", messages=[_user("x")], **GREEDY)
    follow = [_user("x"), one.choices[0].message.model_dump(exclude_none=True), _user("y")]
    raw = await bob.chat.completions.with_raw_response.create(model="any", messages=follow,
                                                               **GREEDY)
    assert raw.headers["x-session-id"] != one.infernode["session"]  # type: ignore[attr-defined]


def test_gateway_refuses_to_listen_beyond_loopback_without_keys(tmp_path: Path):
    """Without API keys a public address is refused, by the config and by the gateway."""
    with pytest.raises(ConfigError, match="only with API keys"):
        NodeConfig(openai_port=8000, openai_host="0.0.0.0")
    with pytest.raises(GatewayBindError, match="without API keys"):
        GatewaySettings(host="0.0.0.0")
    keys = tmp_path / "keys"
    keys.write_text("k" * 20 + " agent\n")
    config = NodeConfig(openai_port=8000, openai_host="0.0.0.0", api_keys=keys)
    assert gateway_settings(config, 8000, "0.0.0.0").api_keys == {"k" * 20: "agent"}
