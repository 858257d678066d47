"""What an agent can put into the intake cannot hurt another agent or the node.

- A prompt published to a literal ``infer.prompt.*`` or ``infer.prompt.>`` (the server
  takes it, and the transform moves no wildcard subject to a partition) is refused with a
  ``rejected`` event and leaves the intake, also when an older node's consumer stored it.
- The intake de-duplicates nothing across sessions: B's prompt carrying the ``Nats-Msg-Id``
  A just used is recorded and answered.
- ``Infer-Answer-To`` is honoured only when the node's ask door wrote it (with its seal) and
  names a requester's inbox: a forged or sealed-elsewhere header is refused with
  ``forbidden`` 403 and nothing is published where it points.
"""

from __future__ import annotations

import dataclasses
import json

from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig

from actors.seal import is_sealed, seal
from node.streams import answer_seal_secret, ensure_streams
from schemas.chat import ChatMessage
from schemas.messages import AnswerReply, PromptRequest
from schemas.subjects import (
    ANSWER_SEAL_HEADER,
    ANSWER_TO_HEADER,
    ERROR_HEADER,
    MSG_ID_HEADER,
    Subjects,
)
from tests.fake_engine import FakeNode
from tests.helpers import EventCollector

S = Subjects()
WILDCARD_SUBJECTS = ("infer.prompt.*", "infer.prompt.>")
NODE_INBOX = "_INBOX.infernode"
FORBIDDEN_TARGETS = (
    "orders.create", "_INBOX.agent-b.a1b2c3", "tenant2.infer.prompt.victim",
    "infer2.admin.delete", f"{NODE_INBOX}.a1b2c3",
)
"""Where an agent may not publish: an application's subject, another agent's inbox, another
deployment's prompts and admin verbs, the node's own inboxes (as nats-agents.conf grants)."""


def prompt_body(text: str, key: str | None = None) -> bytes:
    """A one-message prompt that wants a turn."""
    prompt = PromptRequest(messages=(ChatMessage(role="user", content=text),),
                           idempotency_key=key, max_tokens=3)
    return prompt.model_dump_json().encode()


async def stored_prompts(nc: Client) -> dict[str, int]:
    """Subjects (with counts) of what the intake holds that no partition's consumer reads."""
    info = await nc.jetstream().stream_info(S.prompt_stream, subjects_filter=S.prompt_all())
    return info.state.subjects or {}


async def test_literal_wildcard_prompts_are_rejected_and_the_intake_keeps_none(nats_server, nc):
    """50 prompts on a literal infer.prompt.* / infer.prompt.> (half stored before the node
    started, beside an older version's consumer) each get a rejected event, the intake holds
    none of them afterwards, and a normal prompt is still answered."""
    js = nc.jetstream()
    await ensure_streams(js, S, 1 << 20)
    # The consumer an older version made for prompts that name no session.
    await js.add_consumer(S.prompt_stream, ConsumerConfig(
        durable_name=S.admission_consumer(None), name=S.admission_consumer(None),
        filter_subject="infer.prompt.*.>", ack_policy=AckPolicy.EXPLICIT,
    ))
    rejected = await EventCollector.start(nc, S.rejected())
    for i in range(25):
        await js.publish(WILDCARD_SUBJECTS[i % 2], prompt_body(f"flood {i}"))
    async with FakeNode(nats_server.url, heartbeat_s=0):
        for i in range(25, 50):
            await js.publish(WILDCARD_SUBJECTS[i % 2], prompt_body(f"flood {i}"))
        await rejected.wait_until(lambda ms: len(ms) >= 50, timeout=30)
        assert {e["code"] for e in rejected.decoded} == {"bad_request"}
        info = await js.consumer_info(S.prompt_stream, S.admission_consumer(None))
        assert (info.num_pending, info.num_ack_pending) == (0, 0)
        assert await stored_prompts(nc) == {}
        done = await EventCollector.start(nc, S.events("after-flood", "commit"))
        await js.publish(S.prompt("after-flood"), prompt_body("hello"))
        await done.wait_until(lambda ms: len(ms) >= 1, timeout=30)
    assert len(rejected.messages) == 50
    assert all("not a valid session id" in json.loads(m.data)["message"]
               for m in rejected.messages)


async def test_another_sessions_prompt_with_the_same_msg_id_right_after_is_answered(
    nats_server, nc
):
    """B's prompt with the Nats-Msg-Id A's prompt carried, sent at once after it, is stored
    (no duplicate in its PubAck), recorded and answered, also on an intake an older version
    made with a de-duplication window."""
    js = nc.jetstream()
    await ensure_streams(js, S, 1 << 20)
    made = (await js.stream_info(S.prompt_stream)).config
    await js.delete_stream(S.prompt_stream)
    await js.add_stream(dataclasses.replace(made, sources=None, duplicate_window=0.1))
    async with FakeNode(nats_server.url, heartbeat_s=0):
        commits = await EventCollector.start(nc, S.events("*", "commit"))
        first = await js.publish(S.prompt("a-1"), prompt_body("from a"),
                                 headers={MSG_ID_HEADER: "id-1"})
        second = await js.publish(S.prompt("b-1"), prompt_body("from b"),
                                  headers={MSG_ID_HEADER: "id-1"})
        assert not first.duplicate and not second.duplicate, "B's prompt was dropped"
        await commits.wait_until(lambda ms: len(ms) >= 2, timeout=30)
        assert sorted(commits.subjects) == [S.events("a-1", "commit"), S.events("b-1", "commit")]


async def watch(nc: Client, subjects: tuple[str, ...]) -> list[EventCollector]:
    """A collector on each subject (subscribed before anything is published)."""
    return [await EventCollector.start(nc, subject) for subject in subjects]


async def forbidden_errors(events: EventCollector, count: int) -> list[dict[str, object]]:
    """The first ``count`` error events, once that many arrived; each is forbidden 403."""
    await events.wait_until(lambda ms: len(ms) >= count, timeout=30)
    errors = events.decoded[:count]
    assert {(e["code"], e["status"]) for e in errors} == {("forbidden", 403)}, errors
    return errors


async def test_a_prompt_naming_where_to_answer_is_refused_403_and_nothing_is_published_there(
    nats_server, nc
):
    """Prompts whose own Infer-Answer-To (with no seal, a made-up seal, or a body that is not
    even a prompt) names a subject the agent may not publish to are refused with forbidden
    403 before any other check, nothing reaches those subjects, and a real ask is answered."""
    targets = await watch(nc, FORBIDDEN_TARGETS)
    js = nc.jetstream()
    async with FakeNode(nats_server.url, heartbeat_s=0):
        errors = await EventCollector.start(nc, S.events("*", "error"))
        for i, target in enumerate(FORBIDDEN_TARGETS):
            headers = {ANSWER_TO_HEADER: target, MSG_ID_HEADER: f"forged-{i}:k"}
            if i % 2:
                headers[ANSWER_SEAL_HEADER] = "0" * 64
            body = b"not a prompt" if i == 2 else prompt_body("answer elsewhere")
            await js.publish(S.prompt(f"forged-{i}"), body, headers=headers)
        found = await forbidden_errors(errors, len(FORBIDDEN_TARGETS))
        assert all(ANSWER_TO_HEADER in str(e["message"]) for e in found)
        answer = await nc.request(S.ask("real"), b"hello", timeout=30)
        assert not (answer.headers and ERROR_HEADER in answer.headers), answer.data
        assert AnswerReply.model_validate_json(answer.data).session == "real"
    assert {t.subject: t.messages for t in targets} == dict.fromkeys(FORBIDDEN_TARGETS, [])


async def test_an_ask_is_answered_only_to_a_requesters_inbox(make_node, nc):
    """Asks whose reply subject is no requester's inbox (an application's subject, another
    deployment's prompts or admin verbs, the node's own inbox prefix) each get a forbidden 403
    error event and no publish there; an ask over an ordinary inbox is answered."""
    await make_node(nats_inbox_prefix=NODE_INBOX)
    unanswerable = tuple(t for t in FORBIDDEN_TARGETS if not t.startswith("_INBOX.agent-b"))
    targets = await watch(nc, unanswerable)
    errors = await EventCollector.start(nc, S.events("*", "error"))
    for i, target in enumerate(unanswerable):
        await nc.publish(S.ask(f"asker-{i}"), b"hello", reply=target)
    found = await forbidden_errors(errors, len(unanswerable))
    assert sorted(str(e["session"]) for e in found) == [
        f"asker-{i}" for i in range(len(unanswerable))
    ]
    answer = await nc.request(S.ask("real"), b"hello", timeout=60)
    assert AnswerReply.model_validate_json(answer.data).session == "real"
    assert {t.subject: t.messages for t in targets} == dict.fromkeys(unanswerable, [])


async def test_a_seal_holds_for_its_own_session_and_inbox_only(nc):
    """The deployment's secret is made once and read back the same; a seal made for one
    session, message id and inbox does not pass for another session or inbox."""
    js = nc.jetstream()
    secret = await answer_seal_secret(js, S, 1)
    assert await answer_seal_secret(js, S, 1) == secret and len(secret) == 32
    headers = {MSG_ID_HEADER: "a:k", ANSWER_TO_HEADER: "_INBOX.x.1",
               ANSWER_SEAL_HEADER: seal(secret, "a", "a:k", "_INBOX.x.1")}
    assert is_sealed(secret, "a", headers)
    assert not is_sealed(secret, "b", headers)
    assert not is_sealed(secret, "a", {**headers, ANSWER_TO_HEADER: "_INBOX.y.1"})
    assert not is_sealed(b"another deployment", "a", headers)
