"""Recovery without the agent's help: a lost bus, a lost intake ack, a node killed mid-pull.

- A turn whose result the bus lost is run again by the node itself (no retry prompt), and
  after a nats-server SIGKILL and restart every accepted prompt is answered; an agent that
  missed events while reconnecting reads the answer from the session's history.
- A prompt whose intake ack was lost after it was recorded is redelivered and recognised
  by its intake sequence: one user record, one commit.
- Prompts a killed node had pulled but not acked are recorded in intake order at the next
  start, without waiting out the consumer's ack timeout.
- Deleted ids still answer gone (410) after the node restarts (tombstones are rebuilt).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from actors.admission import Admission
from node.client import InfernodeClient, TurnResult
from node.config import NodeConfig
from node.nats_server import EmbeddedNats
from node.streams import ensure_streams
from schemas.chat import ChatMessage, SamplingParams
from schemas.messages import PromptRequest
from schemas.records import AssistantRecord, CommitRecord, UserRecord
from schemas.subjects import Subjects, partition_of
from tests.fake_engine import FakeNode
from tests.helpers import EventCollector, until
from tests.support.sessions import (
    LogWatch,
    Session,
    records,
    send,
)

S = Subjects()
GREEDY = SamplingParams(temperature=0.0)


# -- 3. a lost bus (a lost engine result alone: test_session_invariants.py) -----------------
@pytest.fixture
async def own_server(tmp_path: Path) -> Any:
    """A nats-server this test may kill and restart; stopped after the test's nodes."""
    server = EmbeddedNats(tmp_path / "nats-killable")
    await server.start()
    yield server
    await server.stop()


async def sigkill_and_restart(server: EmbeddedNats, down_s: float) -> None:
    """SIGKILL the server, keep it down for ``down_s`` (the outage), start it on its port."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    await server.wait()
    await asyncio.sleep(down_s)  # the outage itself: what is measured is the recovery after it
    await server.restart()


@pytest.mark.timeout(180)
async def test_a_nats_server_sigkill_mid_burst_answers_every_accepted_prompt_without_client_action(
    make_node, own_server
):
    """Given prompts accepted on four sessions and turns running, when nats-server is
    SIGKILLed and restarted 3 s later, then every accepted prompt is answered by exactly one
    commit with no retry from the agent, and the history holds each answer (how an agent
    that missed events during the outage reads it)."""
    sessions = [f"bus-{i}" for i in range(4)]
    node = await make_node(url=own_server.url, bank_ram_bytes=0, heartbeat_s=0)
    nc = await nats.connect(own_server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        events = await EventCollector.start(nc, S.events("*", "*"))
        keys = [await send(nc, s, f"question {i}", max_tokens=40, sampling=GREEDY)
                for i in range(4) for s in sessions]
        await events.wait_until(lambda ms: len(accepted_ids(ms)) >= len(keys), timeout=60)
        accepted = accepted_ids(events.messages)
        await sigkill_and_restart(own_server, 3.0)
        async with InfernodeClient(node.url, nc=nc) as client:
            await wait_answered_in_history(client, sessions, accepted, events, timeout=90)
        for s in sessions:
            log = await records(nc, s)
            parents = [p for r in log if isinstance(r, AssistantRecord) for p in r.parent_ids]
            assert len(parents) == len(set(parents)), f"{s}: a prompt was answered twice"
            generations = [r.generation for r in log if isinstance(r, CommitRecord)]
            assert generations == list(range(1, len(generations) + 1)), s
    finally:
        await nc.close()


def accepted_ids(msgs: list[Msg]) -> set[str]:
    """Record ids named by the ``accepted`` events among ``msgs``."""
    return {i for m in msgs if m.subject.endswith(".accepted")
            for i in json.loads(m.data)["message_ids"]}


async def wait_answered_in_history(
    client: InfernodeClient, sessions: list[str], accepted: set[str],
    events: EventCollector, timeout: float,
) -> None:
    """Until the sessions' histories answer every accepted id (each commit event, or a
    2 s lull when events were published while this client reconnected, reads them again)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        answered: set[str] = set()
        try:
            for s in sessions:
                history = await client.history(s)
                answered |= {
                    p for r in history.records if r.kind == "assistant" for p in r.parent_ids
                }
        except (NoRespondersError, NatsTimeoutError):  # the node has not resubscribed yet
            answered = set()
        left = deadline - loop.time()
        if answered >= accepted:
            return
        assert left > 0, f"{len(accepted - answered)} accepted prompts never answered"
        commits = sum(1 for m in events.messages if m.subject.endswith(".commit"))
        with contextlib.suppress(AssertionError):
            await events.wait_until(
                lambda ms, n=commits: sum(1 for m in ms if m.subject.endswith(".commit")) > n,
                timeout=min(left, 2.0),
            )


# -- 13. a lost intake ack ----------------------------------------------------------------
async def test_a_recorded_prompt_whose_intake_ack_is_lost_is_recorded_and_answered_once(
    nats_server, nc: Client, monkeypatch: pytest.MonkeyPatch
):
    """Given a prompt without idempotency key or message id whose intake ack is lost after it
    was recorded (naked instead), when intake redelivers it, then the runner recognises its
    intake sequence: one user record, one commit, and the redelivery is acked."""
    settled: list[int] = []
    real_settle = Admission._settle

    async def lose_first_ack(self: Admission, msg: Msg, rejected: bool) -> None:
        settled.append(msg.metadata.sequence.stream)
        if len(settled) == 1:
            await msg.nak()  # the ack never reaches the server: offered again at once
            return
        await real_settle(self, msg, rejected)

    monkeypatch.setattr(Admission, "_settle", lose_first_ack)
    async with FakeNode(nats_server.url, heartbeat_s=0) as node:
        watch = await Session.watch(nc, "ack")
        prompt = PromptRequest(messages=(ChatMessage(role="user", content="only once"),))
        ack = await nc.jetstream().publish(S.prompt("ack"), prompt.model_dump_json().encode())
        await until(lambda: len(settled) >= 2, timeout=20, what="the redelivery")
        await watch.commits(1)
        assert settled == [ack.seq, ack.seq]
        log = await records(nc, "ack")
        users = [r for r in log if isinstance(r, UserRecord)]
        assert len(users) == 1 and users[0].intake_seq == ack.seq
        assert len([r for r in log if isinstance(r, CommitRecord)]) == 1
        assert len(watch.of("accepted")) == 1 and len(node.fake.requests) == 1
        info = await nc.jetstream().stream_info(S.prompt_stream)
        assert info.state.messages == 0, "the redelivered prompt was not acked"


# -- 4. prompts a killed node had pulled ----------------------------------------------------
async def test_prompts_pulled_by_a_killed_node_are_recorded_in_intake_order_without_the_ack_wait(
    nats_server, nc: Client
):
    """Given three prompts pulled from intake and never acked (a node SIGKILLed after its
    fetch) and three published after them, when a node starts, then all six are recorded in
    the order they reached the intake stream, well before the 30 s ack timeout."""
    js = nc.jetstream()
    await ensure_streams(js, S, 8 << 20)
    texts = [f"prompt {i}" for i in range(6)]
    for text in texts[:3]:
        await send(nc, "order", text)
    partition = partition_of("order", NodeConfig().partitions)
    dead = await js.pull_subscribe(
        S.intake(partition), durable=S.admission_consumer(partition), stream=S.prompt_stream
    )
    pulled = await dead.fetch(3, timeout=5)
    assert len(pulled) == 3  # delivered, never acked: what a killed admission leaves behind
    for text in texts[3:]:
        await send(nc, "order", text)
    started = time.monotonic()
    watch = await Session.watch(nc, "order")  # before the node: its first events are seen
    async with FakeNode(nats_server.url, heartbeat_s=0):
        await watch.until(lambda s: sum(len(e["message_ids"]) for e in s.of("accepted")) >= 6,
                          timeout=20)
        assert time.monotonic() - started < 15, "the restart waited out the ack timeout"
        users = [r for r in await records(nc, "order") if isinstance(r, UserRecord)]
    assert [u.message.content for u in users] == texts
    assert [u.intake_seq for u in users] == sorted(u.intake_seq for u in users)


# -- 13. tombstones after a restart -------------------------------------------------------
async def test_a_deleted_session_answers_gone_after_the_node_restarts(nats_server, nc: Client):
    """Given a deleted session, when the node restarts, then a prompt to its id is refused
    gone (410) and nothing is recorded; a session that was not deleted is served."""
    async with FakeNode(nats_server.url, heartbeat_s=0) as node:
        watch = await Session.watch(nc, "gone")
        await send(nc, "gone", "hello")
        await watch.commits(1)
        async with InfernodeClient(node.url, nc=nc) as client:
            await client.delete("gone")
    async with FakeNode(nats_server.url, heartbeat_s=0) as node:
        assert "gone" in node.host.tombstones
        error = await watch.error(await send(nc, "gone", "back again"))
        assert error["code"] == "gone" and error["status"] == 410
        assert [r.type for r in await records(nc, "gone")] == ["record.delete.v1"]
        alive = await Session.watch(nc, "alive")
        await send(nc, "alive", "still here")
        await alive.commits(1)



async def test_a_client_waiting_on_a_turn_the_bus_lost_gets_the_answer_of_its_rerun(
    nats_server, nc: Client
):
    """Given an agent streaming with ``InfernodeClient.prompt`` and another waiting in
    ``ask``, each on a turn whose result the bus lost, when the node reruns the turns, then
    both get the rerun's committed answer instead of an error or an abort."""
    from tests.fake_engine import Script

    async with FakeNode(nats_server.url, heartbeat_s=0, turn_probe_s=0.2) as node:
        for session in ("stream", "asked"):
            node.fake.script(session, Script(tokens=("lost",), lose_reply=True))
            node.fake.script(session, Script(tokens=("found", " it")))
        async with InfernodeClient(node.url, nc=nc) as client:
            result = TurnResult()
            async for _ in client.prompt("stream", "are you there?", timeout=30, result=result):
                pass
            answer = await client.ask("asked", "are you there?", timeout=30)
    assert result.commit is not None and result.commit.generation == 1
    assert result.text == "found it" and result.done is not None
    assert answer.text == "found it" and answer.generation == 1
    assert answer.finish_reason != "aborted"


async def test_a_turn_whose_end_the_log_did_not_take_is_recorded_once_the_log_is_back(
    nats_server, nc: Client, logs: LogWatch
):
    """Given a turn that finishes while the record log is gone, when the log comes back,
    then the same turn's commit is recorded (the engine ran it once) and the session
    serves the next prompt."""
    async with FakeNode(nats_server.url, heartbeat_s=0) as node:
        js = nc.jetstream()
        watch = await Session.watch(nc, "ends")
        gate = node.fake.hold("ends", after=1)
        asked = (await watch.accepted(await send(nc, "ends", "hold on")))["message_ids"]
        await gate.wait_reached()
        await js.delete_stream(S.record_stream)
        gate.release()
        await logs.wait("turn_end_not_recorded", session="ends")
        await ensure_streams(js, S, 8 << 20)
        commit = (await watch.commits(1, timeout=20))[0]
        assert commit["parent_ids"] == asked and commit["generation"] == 1
        assert len(node.fake.requests) == 1
        assert [r.type for r in await records(nc, "ends")][-2:] == [
            "record.assistant.v1", "record.commit.v1"
        ]
        await send(nc, "ends", "and then")
        assert (await watch.commits(2))[1]["generation"] == 2
