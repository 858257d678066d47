"""What several nodes wrote: the whole record log with the node that appended each record, the
checks that every prompt was answered once by one writer at a time, and prompt bytes."""

from __future__ import annotations

import uuid
from collections import defaultdict

from nats.aio.client import Client
from nats.js.api import DeliverPolicy

from schemas.chat import ChatMessage, SamplingParams
from schemas.messages import PromptRequest
from schemas.records import RECORD_ADAPTER, CommitRecord, Record, UserRecord
from schemas.subjects import NODE_HEADER, Subjects
from tests.helpers import EventCollector

S = Subjects()
GREEDY = SamplingParams(temperature=0.0)
TTL = "2"  # seconds: short, so a dead node's partitions move within the test's patience


async def record_log(nc: Client) -> list[tuple[str, str | None, Record]]:
    """``(session, node that appended it, record)`` of every record, in stream order."""
    js = nc.jetstream()
    last = await js.get_last_msg(S.record_stream, S.records_all())
    sub = await js.subscribe(S.records_all(), ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL)
    out = []
    prefix = len(S.records(""))
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            node = (msg.headers or {}).get(NODE_HEADER)
            out.append((msg.subject[prefix:], node, RECORD_ADAPTER.validate_json(msg.data)))
            if msg.metadata.sequence.stream >= (last.seq or 0):
                return out
    finally:
        await sub.unsubscribe()


Written = list[tuple[str | None, Record]]
"""A session's records, each with the node that appended it."""


def by_session(log: list[tuple[str, str | None, Record]]) -> dict[str, Written]:
    """The record log, split by session."""
    out: dict[str, Written] = defaultdict(list)
    for session, node, record in log:
        out[session].append((node, record))
    return out


def assert_answered_once(records: Written, session: str) -> None:
    """Every user record answered by exactly one commit; generations 1, 2, 3… in order."""
    users = [r.id for _, r in records if isinstance(r, UserRecord)]
    commits = [r for _, r in records if isinstance(r, CommitRecord)]
    answered = [p for c in commits for p in c.parent_ids]
    assert sorted(answered) == sorted(users), f"{session}: answered {answered}, asked {users}"
    assert [c.generation for c in commits] == list(range(1, len(commits) + 1)), session


def assert_one_writer_at_a_time(records: Written, session: str) -> None:
    """The session's records come in runs per node, and no node comes back after another
    node wrote (a node that lost the session never writes to it again)."""
    writers: list[str | None] = []
    for node, _ in records:
        if not writers or writers[-1] != node:
            assert node not in writers, f"{session}: {node} wrote again after {writers[-1]}"
            writers.append(node)


def prompt(text: str, max_tokens: int = 3) -> bytes:
    """A greedy one-message prompt, encoded, with its own idempotency key."""
    return PromptRequest(
        messages=(ChatMessage(role="user", content=text),), sampling=GREEDY,
        max_tokens=max_tokens, idempotency_key=uuid.uuid4().hex,
    ).model_dump_json().encode()


def commits_of(events: EventCollector) -> dict[str, int]:
    """Events collected, counted by session."""
    count: dict[str, int] = defaultdict(int)
    for m in events.messages:
        count[S.event_of(m.subject)[0]] += 1
    return count
