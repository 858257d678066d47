"""One request, one answer on ``infer.ask.<session>``, durable through intake; micro endpoints."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from node.client import InfernodeClient
from node.nats_server import EmbeddedNats
from schemas.chat import SamplingParams
from schemas.errors import ErrorCode, InferError
from schemas.messages import AnswerReply, ErrorEvent, PromptRequest
from schemas.subjects import ANSWER_TO_HEADER, ERROR_HEADER, Subjects
from tests.helpers import EventCollector
from tests.support.node_process import NodeProcess, kinds

S = Subjects()
GREEDY = SamplingParams(temperature=0.0)


def answer_of(msg) -> AnswerReply:
    assert not (msg.headers and ERROR_HEADER in msg.headers), msg.data
    return AnswerReply.model_validate_json(msg.data)


def error_of(msg) -> ErrorEvent:
    assert msg.headers and ERROR_HEADER in msg.headers, msg.data
    event = ErrorEvent.model_validate_json(msg.data)
    assert msg.headers[ERROR_HEADER] == event.code.value
    assert msg.headers["Nats-Service-Error-Code"] == str(event.status)
    assert msg.headers["Nats-Service-Error"] == event.message
    return event


async def test_a_plain_text_ask_is_a_user_message_answered_by_the_committed_turn(make_node, nc):
    """Given a node, `nats req infer.ask.demo 'Hello'` gets the committed turn's answer."""
    node = await make_node()
    answer = answer_of(await nc.request(S.ask("demo"), b"Hello", timeout=60))
    assert answer.session == "demo" and answer.generation == 1
    assert answer.finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens > 0 and answer.model_id
    async with InfernodeClient(node.url) as client:
        history = await client.history("demo")
    user, assistant = [r for r in history.records if r.kind in ("user", "assistant")]
    assert (user.role, user.content) == ("user", "Hello")
    assert user.id in answer.parent_ids
    assert assistant.id == answer.record_id and assistant.content == answer.text


async def test_an_openai_shaped_ask_is_accepted_and_its_settings_honoured(make_node, nc):
    """Given an OpenAI chat body (model, top-level temperature, max_completion_tokens, stop
    string, stream, n=1, user, developer role, text parts), the answer honours its settings:
    at most max_completion_tokens, greedy (equal to the same ask in Python form)."""
    node = await make_node()
    body = {
        "model": "gpt-4o", "temperature": 0, "top_p": 0.5, "seed": 3,
        "frequency_penalty": 0.2, "presence_penalty": 0.1, "max_completion_tokens": 5,
        "stop": "\n\n\n", "stream": True, "n": 1, "user": "agent-7",
        "parallel_tool_calls": False,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Say"},
                                         {"type": "text", "text": "hello"}]},
        ],
    }
    one = answer_of(await nc.request(S.ask("oa-1"), json.dumps(body).encode(), timeout=60))
    assert 0 < one.usage.completion_tokens <= 5
    async with InfernodeClient(node.url) as client:
        history = await client.history("oa-1")
        same = await client.ask(
            "oa-2", PromptRequest.model_validate(body).messages, max_tokens=5, stop=["\n\n\n"],
            sampling=SamplingParams(temperature=0, top_p=0.5, seed=3, frequency_penalty=0.2,
                                    presence_penalty=0.1),
        )
    system, user = [r for r in history.records if r.kind == "user"]
    assert (system.role, system.content) == ("system", "Be brief.")
    assert (user.role, user.content) == ("user", "Say\nhello")
    assert same.text == one.text
    # The same prompt and settings; oa-2 may restore oa-1's banked prefix (content-addressed).
    assert (same.usage.prompt_tokens, same.usage.completion_tokens) == (
        one.usage.prompt_tokens, one.usage.completion_tokens)


@pytest.mark.parametrize(("body", "field"), [
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 5}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.2,
      "sampling": {"temperature": 0.9}}, "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "image_url"),
    ({"messages": [{"role": "user", "contnet": "hi"}]}, "contnet"),
    ({"messages": [{"role": "user", "content": "hi"}], "reply": False}, "reply: false"),
    ({"messages": []}, "at least one message"),
])
async def test_a_bad_or_unanswerable_ask_gets_400_naming_why_and_nothing_is_recorded(
    make_node, nc, body, field
):
    """A typo, an unsupported OpenAI field, or an ask with no turn to answer it (reply false,
    no messages) is one typed 400 naming it; nothing is recorded and the node serves on."""
    node = await make_node()
    error = error_of(await nc.request(S.ask("bad"), json.dumps(body).encode(), timeout=30))
    assert error.code == ErrorCode.BAD_REQUEST and field in error.message
    async with InfernodeClient(node.url) as client:
        with pytest.raises(InferError) as missing:
            await client.history("bad")
        assert missing.value.code == ErrorCode.UNKNOWN_SESSION
        assert (await client.ask("bad", "still serving", max_tokens=2, timeout=60)).generation == 1


async def test_a_refusal_after_intake_reaches_the_asker_with_its_details(make_node, nc):
    """An ask refused by the session runner (409 on expect_generation) gets that typed error."""
    await make_node()
    answer_of(await nc.request(S.ask("gen"), b"first", timeout=60))
    body = {"messages": [{"role": "user", "content": "hi"}], "expect_generation": 4}
    error = error_of(await nc.request(S.ask("gen"), json.dumps(body).encode(), timeout=30))
    assert error.code == ErrorCode.CONFLICT and error.details["generation"] == 1


async def test_a_failed_turn_answers_the_ask_with_its_typed_error(make_node, nc):
    """A prompt that cannot fit the context gets context_overflow 422 as its answer."""
    await make_node(n_ctx=64)
    error = error_of(await nc.request(S.ask("big"), ("word " * 300).encode(), timeout=60))
    assert error.code == ErrorCode.CONTEXT_OVERFLOW and error.status == 422


async def test_an_aborted_turn_answers_the_ask_with_its_partial_text(make_node, nc):
    """Given an ask whose turn is streaming, an abort answers it: finish_reason aborted, the
    provisional record's id, the generation unchanged."""
    node = await make_node(n_ctx=4096)
    events = await EventCollector.start(nc, S.events_all("ab"))
    body = PromptRequest.model_validate({"messages": [{"role": "user", "content": "go"}],
                                         "max_tokens": 4000, "temperature": 0})
    asked = asyncio.ensure_future(nc.request(S.ask("ab"), body.model_dump_json().encode(),
                                             timeout=120))
    await events.wait_until(lambda ms: bool(kinds(events, "token")), timeout=60)
    async with InfernodeClient(node.url) as client:
        assert (await client.abort("ab")).aborted
    answer = answer_of(await asked)
    (provisional,) = kinds(events, "provisional")
    assert answer.finish_reason == "aborted" and answer.generation == 0
    assert answer.record_id == provisional["record_id"] and answer.text == provisional["text"]


async def test_the_node_never_answers_to_its_own_subjects(make_node, nc):
    """An ask whose reply subject (or a forged Infer-Answer-To header) names one of the node's
    subjects is not answered there, and the forged prompt is refused with nothing recorded."""
    await make_node()
    victim = await EventCollector.start(nc, "infer.prompt.victim")
    await nc.publish(S.ask("sneaky"), b"hello", reply="infer.prompt.victim")
    events = await EventCollector.start(nc, S.events_all("forged"))
    await nc.jetstream().publish(
        S.prompt("forged"), b'{"messages":[{"role":"user","content":"x"}]}',
        headers={ANSWER_TO_HEADER: "infer.prompt.victim"},
    )
    (error,) = [json.loads(m.data) for m in await events.wait_until(
        lambda ms: any(m.subject.endswith(".error") for m in ms), timeout=30)]
    assert error["code"] == "forbidden" and ANSWER_TO_HEADER in error["message"]
    # A later ask on the same connection is answered: the earlier ones were handled first.
    answer_of(await nc.request(S.ask("sneaky"), b"after", timeout=60))
    assert victim.messages == []


async def test_micro_info_lists_the_endpoints_and_stats_count_requests_and_errors(make_node, nc):
    """$SRV.INFO lists ask and the admin verbs; $SRV.STATS counts each one's requests, errors
    and processing time."""
    node = await make_node()
    info = json.loads((await nc.request("$SRV.INFO.infernode", b"", timeout=5)).data)
    subjects = {e["name"]: e["subject"] for e in info["endpoints"]}
    assert subjects == {
        "ask": "infer.ask.*", "health": "infer.admin.health",
        "sessions": "infer.admin.sessions", "session": "infer.admin.session",
        "metrics": "infer.admin.metrics", "delete": "infer.admin.delete",
        "count_tokens": "infer.admin.count_tokens",
    }
    answer_of(await nc.request(S.ask("st"), b"Hello", timeout=60))
    error_of(await nc.request(S.ask("st"), b"   ", timeout=30))
    async with InfernodeClient(node.url) as client:
        await client.health()
        with pytest.raises(InferError):
            await client.history("nobody")
    stats = json.loads((await nc.request("$SRV.STATS.infernode", b"", timeout=5)).data)
    by_name = {e["name"]: e for e in stats["endpoints"]}
    assert (by_name["ask"]["num_requests"], by_name["ask"]["num_errors"]) == (2, 1)
    assert by_name["ask"]["processing_time"] > 0
    assert (by_name["health"]["num_requests"], by_name["health"]["num_errors"]) == (1, 0)
    assert (by_name["session"]["num_requests"], by_name["session"]["num_errors"]) == (1, 1)
    assert "empty" in by_name["ask"]["last_error"]


async def test_a_retried_ask_with_the_same_key_is_told_where_its_answer_is(make_node, nc):
    """A second ask with an idempotency key already taken gets 409, and is not recorded twice."""
    node = await make_node()
    body = json.dumps({"messages": [{"role": "user", "content": "once"}], "max_tokens": 3,
                       "idempotency_key": "k-1"}).encode()
    first = answer_of(await nc.request(S.ask("idem"), body, timeout=60))
    error = error_of(await nc.request(S.ask("idem"), body, timeout=30))
    assert error.code == ErrorCode.CONFLICT and "k-1" in error.message
    async with InfernodeClient(node.url) as client:
        history = await client.history("idem")
    assert [r.id for r in history.records if r.kind == "user"] == list(first.parent_ids)


@pytest.mark.timeout(300)
async def test_an_ask_cut_by_a_sigkill_is_answered_by_the_restarted_node(
    nats_server: EmbeddedNats, nc, tiny_model: Path, tmp_path: Path
):
    """Given an ask whose turn is streaming, when the node is SIGKILLed and restarted, the
    asker's one request gets the answer of the turn the new process commits; an asker that
    gave up meanwhile finds the same answer in the history."""
    data, url = tmp_path / "node", nats_server.url
    events = await EventCollector.start(nc, S.events_all("cut"))
    node = await NodeProcess.up(url, data, tiny_model, "--ctx", "4096")
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "talk for long"}],
                           "max_tokens": 8000, "temperature": 0}).encode()
        asked = asyncio.ensure_future(nc.request(S.ask("cut"), body, timeout=240))
        await events.wait_until(lambda ms: bool(kinds(events, "token")), timeout=60)
        with pytest.raises(NatsTimeoutError):  # recorded, then this asker stops waiting
            await nc.request(S.ask("cut"), b"me too", timeout=1)
        await events.wait_until(lambda ms: len(kinds(events, "accepted")) == 2, timeout=30)
        assert not kinds(events, "done"), "the turn ended before the kill; make it longer"
        await node.kill()
        node = await NodeProcess.up(url, data, tiny_model, "--ctx", "4096")
        answer = answer_of(await asked)
        async with InfernodeClient(url) as client:
            history = await client.history("cut")
    finally:
        await node.terminate()
    (commit,) = kinds(events, "commit")
    assert answer.turn_id == commit["turn_id"] and answer.generation == 1
    (abort,) = [r for r in history.records if r.kind == "abort"]
    assert abort.reason == "node_restart"
    (assistant,) = [r for r in history.records if r.kind == "assistant"]
    assert assistant.id == answer.record_id and assistant.content == answer.text
    # The asker that gave up finds its answer: the committed turn answered its message too.
    (gave_up,) = [r for r in history.records if r.kind == "user" and r.content == "me too"]
    assert gave_up.id in answer.parent_ids


async def test_an_admin_verb_published_without_a_reply_subject_still_runs(make_node, nc):
    """`nats pub infer.admin.delete` (no reply wanted) deletes the session, as before."""
    node = await make_node()
    answer_of(await nc.request(S.ask("gone"), b"hello", timeout=60))
    await nc.publish(S.admin("delete"), b'{"session": "gone"}')
    async with InfernodeClient(node.url) as client:
        # The endpoint takes its requests one at a time: this one runs after the publish.
        with pytest.raises(InferError) as second:
            await client.delete("gone")
    assert second.value.code == ErrorCode.GONE
