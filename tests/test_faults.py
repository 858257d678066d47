"""Faults under a running node: nats-server restarted beneath it, an engine failing mid-turn.

- The node's connections reconnect to a nats-server restarted on the same port and data
  directory; prompts sent after the restart are answered, and the record log holds every
  turn from before and after it, each prompt answered once.
- An engine that fails after streaming part of a reply leaves a typed error, an honest
  provisional/aborted record and an idle session; the next prompt is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from structlog.testing import capture_logs

import actors.engine.engine as engine_module
from actors.session.records import read_log
from node.client import InfernodeClient
from node.nats_server import EmbeddedNats
from schemas.chat import SamplingParams
from schemas.records import (
    AbortRecord,
    AssistantRecord,
    CommitRecord,
    Record,
    UserRecord,
)
from schemas.subjects import Subjects
from tests.helpers import EventCollector, publish_prompt

S = Subjects()
GREEDY = SamplingParams(temperature=0.0)


async def ask(url: str, session: str, text: str) -> int:
    async with InfernodeClient(url) as client:
        result = await client.complete(session, text, sampling=GREEDY, max_tokens=3, timeout=60)
    assert result.commit is not None
    return result.commit.generation


async def send(nc: Client, session: str, text: str, max_tokens: int = 3) -> str:
    return await publish_prompt(nc, session, text, max_tokens)


async def history(url: str, session: str) -> list[Any]:
    async with InfernodeClient(url) as client:
        return list((await client.history(session)).records)


async def records(url: str, session: str) -> list[Record]:
    """The session's record log, read as the node reads it."""
    nc = await nats.connect(url)
    try:
        return [r async for _, r in read_log(nc.jetstream(), S, session)]
    finally:
        await nc.close()


def answers(log: list[Record]) -> tuple[list[str], Counter[str]]:
    """(user message ids, how many committed assistant records name each as a parent)."""
    users = [r.id for r in log if isinstance(r, UserRecord)]
    parents = Counter(p for r in log if isinstance(r, AssistantRecord) for p in r.parent_ids)
    return users, parents


def _kind(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


@pytest.fixture
async def own_server(tmp_path: Path) -> Any:
    """A nats-server this test may restart; stopped after the test's nodes."""
    server = EmbeddedNats(tmp_path / "nats-restartable")
    await server.start()
    yield server
    await server.stop()


async def test_restart_keeps_the_port_and_the_streams(own_server):
    """EmbeddedNats.restart comes back on the same URL with its JetStream data."""
    url = own_server.url
    nc = await nats.connect(url)
    await nc.jetstream().add_stream(name="KEEP", subjects=["keep.>"])
    await nc.jetstream().publish("keep.it", b"still here")
    await nc.close()
    await own_server.restart()
    assert own_server.url == url
    nc = await nats.connect(url)
    try:
        assert (await nc.jetstream().get_msg("KEEP", 1)).data == b"still here"
    finally:
        await nc.close()


@pytest.mark.timeout(90)
async def test_node_reconnects_after_a_nats_restart_and_answers_every_prompt_once(
    make_node, own_server
):
    """After a restart new prompts are answered; the log keeps every turn, each answered once."""
    sessions = [f"restart-{i}" for i in range(4)]
    node = await make_node(url=own_server.url, bank_ram_bytes=0, heartbeat_s=0)
    assert await ask(node.url, sessions[0], "before the restart") == 1

    nc = await nats.connect(own_server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    events = await EventCollector.start(nc, S.events("*", "*"))
    try:
        before = {s: [await send(nc, s, f"burst {i}") for i in range(3)] for s in sessions}
        keys = [k for ks in before.values() for k in ks]
        await events.wait_until(lambda _: _accepted(events) >= set(keys), timeout=30)
        # Restarted once the burst is answered. A turn whose engine result is published while
        # the server is down is not covered: RunnerHost.generate then waits out its whole
        # turn timeout for a reply the reconnect lost.
        await _wait_answered(node.url, sessions, events, timeout=30, after_restart=False)
        await own_server.restart()
        after = {s: await send(nc, s, "after the restart") for s in sessions}
        await _wait_answered(node.url, sessions, events, timeout=60)
    finally:
        await nc.close()

    for session in sessions:
        users, parents = answers(await records(node.url, session))
        assert len(users) == _expected(session, sessions), session
        assert set(parents) == set(users) and max(parents.values()) == 1, (session, parents)
    assert len(after) == len(sessions)


def _accepted(events: EventCollector) -> set[str]:
    return {
        json.loads(m.data).get("idempotency_key")
        for m in events.messages if _kind(m.subject) == "accepted"
    }


def _expected(session: str, sessions: list[str], after_restart: bool = True) -> int:
    """User messages a session holds: 3 before, 1 after the restart (and 1 more on the first)."""
    return 3 + int(after_restart) + (1 if session == sessions[0] else 0)


async def _wait_answered(
    url: str, sessions: list[str], events: EventCollector, timeout: float,
    after_restart: bool = True,
) -> None:
    """Until every session holds all its prompts, each answered by a commit (record log).

    Events published while this client was reconnecting are gone, so the record log decides;
    a new commit event is the signal to read it again.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        unanswered = {}
        for session in sessions:
            users, parents = answers(await records(url, session))
            expected = _expected(session, sessions, after_restart)
            missing = expected - len(users) + len(set(users) - set(parents))
            if missing:
                unanswered[session] = missing
        if not unanswered:
            return
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"still unanswered after {timeout:g} s: {unanswered}")
        commits = sum(1 for m in events.messages if _kind(m.subject) == "commit")
        # No event (it may have been published while this client reconnected): read again.
        with contextlib.suppress(AssertionError):
            await events.wait_until(
                lambda ms, n=commits: sum(1 for m in ms if _kind(m.subject) == "commit") > n,
                timeout=min(left, 2.0),
            )


class Reconnects:
    """Counts the node's ``nats_reconnected`` log events; a test waits for a number of them."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Condition()

    def __call__(self, logger: Any, method: str, event: Any) -> Any:
        if event.get("event") == "nats_reconnected":
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._bump()))
        return event

    async def _bump(self) -> None:
        async with self._changed:
            self.count += 1
            self._changed.notify_all()

    async def wait(self, n: int, timeout: float = 30.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.count >= n), timeout)


@pytest.mark.timeout(90)
async def test_a_turn_running_across_a_nats_restart_is_committed_once_the_server_is_back(
    make_node, own_server, monkeypatch
):
    """A turn still decoding while nats-server restarts records its commit after reconnecting."""
    entered, release = threading.Event(), threading.Event()
    real_decode = engine_module.decode

    def held_decode(*args: Any) -> Any:
        if not entered.is_set():
            entered.set()
            release.wait(30)
        return real_decode(*args)

    monkeypatch.setattr(engine_module, "decode", held_decode)
    watch = Reconnects()
    with capture_logs(processors=[watch]):
        node = await make_node(url=own_server.url, bank_ram_bytes=0, heartbeat_s=0)
        back = asyncio.Event()

        async def on_reconnected() -> None:
            back.set()

        nc = await nats.connect(
            own_server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1,
            reconnected_cb=on_reconnected,
        )
        try:
            events = await EventCollector.start(nc, S.events_all("across"))
            await send(nc, "across", "a question asked before the restart")
            assert await asyncio.to_thread(entered.wait, 30), "the turn never started"
            await own_server.restart()
            await watch.wait(len(node._conns))
            await asyncio.wait_for(back.wait(), 30)
            release.set()
            await events.wait_until(
                lambda ms: any(_kind(m.subject) == "commit" for m in ms), timeout=30
            )
        finally:
            release.set()
            await nc.close()
    users, parents = answers(await records(node.url, "across"))
    assert len(users) == 1 and parents == Counter({users[0]: 1})


# -- the engine fails mid-turn --------------------------------------------------------------
def fail_first_decode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the first turn's decode stream ``partial `` and raise; later turns run as usual."""
    real_decode = engine_module.decode
    failures: list[str] = []

    def failing_decode(backend, slot, sampling, stop, max_tokens, emit, cancel, *rest):  # noqa: ANN001
        if not failures:
            failures.append(slot.session)
            emit("partial ")
            raise RuntimeError("the GPU fell off the bus")
        return real_decode(backend, slot, sampling, stop, max_tokens, emit, cancel, *rest)

    monkeypatch.setattr(engine_module, "decode", failing_decode)
    return failures


async def test_an_engine_failing_mid_turn_leaves_a_typed_error_an_aborted_record_and_serves_next(
    make_node, nc, monkeypatch
):
    """A decode that streams a piece and then raises: 500 error, provisional, idle, next served."""
    failures = fail_first_decode(monkeypatch)
    node = await make_node(bank_ram_bytes=0)
    events = await EventCollector.start(nc, S.events_all("faulty"))
    await send(nc, "faulty", "first question")
    await events.wait_until(lambda ms: any(_kind(m.subject) == "aborted" for m in ms), timeout=30)
    kinds = [_kind(m.subject) for m in events.messages]
    error = next(json.loads(m.data) for m in events.messages if _kind(m.subject) == "error")
    assert error["code"] == "internal" and error["status"] == 500
    assert "GPU fell off the bus" in error["message"] and error["turn_id"]
    assert "commit" not in kinds and kinds.index("error") < kinds.index("aborted")
    statuses = [json.loads(m.data) for m in events.messages if _kind(m.subject) == "status"]
    assert statuses[-1]["state"] == "idle" and statuses[-1]["generation"] == 0

    log = await history(node.url, "faulty")
    provisional = [r for r in log if r.kind == "provisional"]
    assert len(provisional) == 1 and provisional[0].status == "ABORTED", [r.kind for r in log]
    assert await ask(node.url, "faulty", "second question") == 1
    assert failures == ["faulty"]


async def test_a_failed_turns_provisional_record_keeps_the_text_it_streamed(
    make_node, nc, monkeypatch
):
    """docs/ARCHITECTURE.md §4.5: the provisional record holds the partial text, failure or
    abort alike."""
    fail_first_decode(monkeypatch)
    node = await make_node(bank_ram_bytes=0)
    events = await EventCollector.start(nc, S.events_all("partial"))
    await send(nc, "partial", "first question")
    await events.wait_until(lambda ms: any(_kind(m.subject) == "aborted" for m in ms), timeout=30)
    provisional = next(
        json.loads(m.data) for m in events.messages if _kind(m.subject) == "provisional"
    )
    assert provisional["text"] == "partial "
    log = await history(node.url, "partial")
    assert [r.content for r in log if r.kind == "provisional"] == ["partial "]


# -- SIGKILL during a burst -----------------------------------------------------------------
@pytest.mark.timeout(180)
async def test_sigkill_during_a_burst_on_many_sessions_answers_every_accepted_prompt_once(
    nats_server, nc, tiny_model, tmp_path
):
    """Turns cut on several sessions at once, prompts queued behind them and more sent while
    the node is down: after the restart every one is answered by exactly one commit."""
    from tests.support.node_process import NodeProcess

    sessions = [f"burst-{i}" for i in range(6)]
    url, data = nats_server.url, tmp_path / "node"
    events = await EventCollector.start(nc, S.events("*", "*"))
    node = await NodeProcess.up(url, data, tiny_model, "--ctx", "4096")
    try:
        keys = []
        for session in sessions:
            keys.append(await send(nc, session, "talk for a long time", max_tokens=1500))
            keys += [await send(nc, session, f"then this {i}") for i in range(2)]
        await events.wait_until(lambda _: _accepted(events) >= set(keys), timeout=60)
        await events.wait_until(lambda ms: any(_kind(m.subject) == "token" for m in ms), 60)
        assert len(_commit_parents(events)) < len(keys), "the burst ended before the kill"
        await node.kill()
        keys += [await send(nc, s, "sent while the node was down") for s in sessions]
        node = await NodeProcess.up(url, data, tiny_model, "--ctx", "4096")
        await events.wait_until(lambda _: _accepted(events) >= set(keys), timeout=60)
        accepted = _accepted_ids(events)
        await events.wait_until(lambda _: set(_commit_parents(events)) >= accepted, timeout=90)
    finally:
        await node.terminate()
    parents = _commit_parents(events)
    assert max(parents.values()) == 1, "a prompt was answered twice"
    cut = 0
    for session in sessions:
        log = await records(url, session)
        cut += sum(1 for r in log if isinstance(r, AbortRecord) and r.reason == "node_restart")
        users, answered = answers(log)
        assert len(users) == len(set(users)) == 4, session
        assert set(users) <= set(answered) and max(answered.values()) == 1
        generations = [r.generation for r in log if isinstance(r, CommitRecord)]
        assert generations == list(range(1, len(generations) + 1)), session
    assert cut >= 1, "no turn was running when the node was killed"


def _accepted_ids(events: EventCollector) -> set[str]:
    return {
        i for m in events.messages if _kind(m.subject) == "accepted"
        for i in json.loads(m.data)["message_ids"]
    }


def _commit_parents(events: EventCollector) -> Counter[str]:
    return Counter(
        p for m in events.messages if _kind(m.subject) == "commit"
        for p in json.loads(m.data)["parent_ids"]
    )
