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

from node.streams import ensure_streams
from schemas.chat import ChatMessage
from schemas.messages import PromptRequest
from schemas.subjects import MSG_ID_HEADER, Subjects
from tests.fake_engine import FakeNode
from tests.helpers import EventCollector

S = Subjects()
WILDCARD_SUBJECTS = ("infer.prompt.*", "infer.prompt.>")


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
