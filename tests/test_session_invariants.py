"""docs/ARCHITECTURE.md §4, one test per session-runner invariant, against a real nats-server.

Most tests drive the node's real actors around a scripted engine (``tests/fake_engine.py``)
so a race can be staged exactly: a turn held at a token, a failure, an overflow. The abort
and retry path also runs once on the real GGUF engine with the tiny model.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from node.client import InfernodeClient
from node.streams import ensure_streams
from schemas.chat import SamplingParams
from schemas.errors import ErrorCode, InferError
from schemas.messages import AbortReply, AbortRequest, PromptRequest
from schemas.records import (
    AbortRecord,
    CommitRecord,
    ProvisionalRecord,
    UserRecord,
)
from schemas.subjects import ABORTED_HEADER, MSG_ID_HEADER, Subjects
from tests.fake_engine import FakeEngine, FakeNode
from tests.helpers import EventCollector
from tests.support.sessions import (
    LogWatch,
    Session,
    records,
    send,
    user,
)

S = Subjects()
GREEDY = SamplingParams(temperature=0.0)


# -- helpers --------------------------------------------------------------------------------


async def retry(nc: Client, session: str) -> str:
    """A prompt with no messages: retry the aborted turn."""
    return await send(nc, session)


async def abort(nc: Client, session: str) -> AbortReply:
    body = AbortRequest(reason="client").model_dump_json().encode()
    msg = await nc.request(S.abort(session), body, timeout=10)
    assert not (msg.headers or {}).get("Infer-Error"), msg.data
    return AbortReply.model_validate_json(msg.data)


@pytest.fixture
async def node(nats_server, logs) -> AsyncIterator[FakeNode]:
    """The node's actors around the scripted engine, on this test's nats-server."""
    async with FakeNode(nats_server.url, heartbeat_s=0) as n:
        yield n


# -- 1. accepted means recorded -----------------------------------------------------------
async def test_accepted_means_recorded(node: FakeNode, nc: Client, logs: LogWatch):
    """Given the record log is down, a prompt stays unacked in intake; accepted follows its record.

    Given the record stream is gone, when a prompt arrives, then admission leaves it in the
    intake stream (no accepted event, no error); when the log is back, then the redelivered
    prompt is recorded once, accepted naming the stored record, answered, and only then acked.
    """
    js = nc.jetstream()
    watch = await Session.watch(nc, "acc")
    await js.delete_stream(S.record_stream)
    key = uuid.uuid4().hex
    prompt = PromptRequest(messages=(user("keep me"),), idempotency_key=key)
    ack = await js.publish(S.prompt("acc"), prompt.model_dump_json().encode())
    await logs.wait("admit_deferred", session="acc")
    assert watch.of("accepted") == [] and watch.of("error") == []
    assert (await js.get_msg(S.prompt_stream, ack.seq)).data  # still in intake, unacked

    await ensure_streams(js, S, 8 << 20)
    accepted = await watch.accepted(key)
    log = await records(nc, "acc")
    users = [r for r in log if isinstance(r, UserRecord)]
    assert [u.id for u in users] == list(accepted["message_ids"])
    assert users[0].intake_seq == ack.seq and users[0].message.content == "keep me"
    await watch.commits(1)

    # Admission settles prompts in order: once a later prompt is accepted, the first is acked.
    await watch.accepted(await send(nc, "acc", "next"))
    with pytest.raises(NotFoundError):
        await js.get_msg(S.prompt_stream, ack.seq)
    assert len([r for r in await records(nc, "acc") if isinstance(r, UserRecord)]) == 2


# -- 2. no lost wake-up -------------------------------------------------------------------
async def test_no_lost_wakeup(node: FakeNode, nc: Client):
    """A prompt admitted while the runner finishes a turn is answered by a following turn.

    Given a turn held after its last token (its result about to be sent), when a prompt is
    admitted, then it is answered by the next turn. Given turns that end on their own, when a
    prompt is published the moment the previous turn's ``done`` or ``commit`` is seen, then
    every prompt is answered and the session ends idle with nothing pending.
    """
    watch = await Session.watch(nc, "wake")
    gate = node.fake.hold("wake", after=2, tokens=("al", "l"))
    await send(nc, "wake", "first")
    await gate.wait_reached()
    second = (await watch.accepted(await send(nc, "wake", "second")))["message_ids"]
    gate.release()
    commits = await watch.commits(2)
    assert [c["parent_ids"] for c in commits][1] == second

    sent: list[asyncio.Task[str]] = []

    async def publish_now(_: Msg) -> None:
        sent.append(asyncio.ensure_future(send(nc, "wake", "again")))

    for stage in ("done", "commit", "done", "commit", "done", "commit"):
        n = len(watch.of("commit"))
        await nc.subscribe(S.events("wake", stage), cb=publish_now, max_msgs=1)
        await send(nc, "wake", f"before {stage}")
        await watch.commits(n + 2)
    keys = await asyncio.gather(*sent)
    answered = {p for c in watch.of("commit") for p in c["parent_ids"]}
    for key in keys:
        assert set((await watch.accepted(key))["message_ids"]) <= answered
    status = await watch.idle()
    assert status["pending"] == 0
    assert node.fake.overlaps == 0


# -- 3. one turn at a time ----------------------------------------------------------------
async def test_one_turn_at_a_time_coalesces_and_names_parents(node: FakeNode, nc: Client):
    """Prompts during a turn are coalesced into the next; each is answered exactly once.

    Given a running turn, when six prompts arrive, then one following turn answers all six,
    naming them as parents in order, over the whole history. Given an idle session, when
    twelve prompts arrive at once, then turns never overlap, every prompt is a parent of
    exactly one commit, and no two replies share a parent.
    """
    watch = await Session.watch(nc, "co")
    gate = node.fake.hold("co", after=1)
    await send(nc, "co", "p0")
    await gate.wait_reached()
    keys = await asyncio.gather(*(send(nc, "co", f"p{i}") for i in range(1, 7)))
    ids = [(await watch.accepted(k))["message_ids"][0] for k in keys]
    gate.release()
    commits = await watch.commits(2)
    assert len(watch.of("started")) == 2
    accepted_order = [e["message_ids"][0] for e in watch.of("accepted")][1:]
    assert commits[1]["parent_ids"] == accepted_order and set(ids) == set(accepted_order)
    second = [m.content for m in node.fake.requests[1].messages]
    users = [r for r in await records(nc, "co") if isinstance(r, UserRecord)]
    assert [u.id for u in users[1:]] == accepted_order
    assert second == ["p0", "partial rest", *(u.message.content for u in users[1:])]

    burst = await Session.watch(nc, "burst")
    keys = await asyncio.gather(*(send(nc, "burst", f"q{i}") for i in range(12)))
    ids = [(await burst.accepted(k))["message_ids"][0] for k in keys]
    await burst.until(lambda s: {p for c in s.of("commit") for p in c["parent_ids"]} >= set(ids))
    parents = [p for c in burst.of("commit") for p in c["parent_ids"]]
    assert sorted(parents) == sorted(ids)  # each once: disjoint, none twice
    flow = [k for k in burst.kinds() if k in ("started", "commit")]
    assert flow == ["started", "commit"] * (len(flow) // 2)
    assert len(burst.of("done")) == len(burst.of("commit")) <= 12
    assert node.fake.overlaps == 0


async def test_reply_false_appends_without_a_turn(node: FakeNode, nc: Client):
    """A ``reply: false`` prompt is recorded and joins the context; no turn answers it.

    Given an idle session, when a prompt with ``reply: false`` arrives, then it is accepted
    and no turn starts; when a question follows, then its turn sees the note before it and
    names only the question as its parent.
    """
    watch = await Session.watch(nc, "note")
    note = (await watch.accepted(await send(nc, "note", "a note", reply=False)))["message_ids"]
    question = (await watch.accepted(await send(nc, "note", "a question")))["message_ids"]
    commit = (await watch.commits(1))[0]
    assert commit["parent_ids"] == question and note[0] not in commit["parent_ids"]
    assert len(watch.of("started")) == 1 and len(node.fake.requests) == 1
    assert [m.content for m in node.fake.requests[0].messages] == ["a note", "a question"]
    assert (await watch.idle())["pending"] == 0


async def test_a_republished_prompt_is_recorded_once(node: FakeNode, nc: Client):
    """A prompt published twice with one key is recorded and answered once; the retry is told."""
    watch = await Session.watch(nc, "idem")
    prompt = PromptRequest(messages=(user("once"),), idempotency_key="k-1")
    for msg_id in ("a", "b"):  # two intake messages, one key
        await nc.jetstream().publish(S.prompt("idem"), prompt.model_dump_json().encode(),
                                     headers={MSG_ID_HEADER: msg_id})
    await watch.commits(1)
    await watch.accepted(await send(nc, "idem", "barrier"))
    await watch.commits(2)
    users = [r for r in await records(nc, "idem") if isinstance(r, UserRecord)]
    assert [u.message.content for u in users] == ["once", "barrier"]
    # The retry is answered too: an accepted event naming the first one's records.
    once = [e for e in watch.of("accepted") if e["idempotency_key"] == "k-1"]
    assert [e["duplicate"] for e in once] == [False, True]
    assert once[1]["message_ids"] == once[0]["message_ids"]
    assert len(watch.of("accepted")) == 3


# -- 4. generation counter ----------------------------------------------------------------
async def test_generation_counter_expect_generation_conflict(node: FakeNode, nc: Client):
    """A mismatched ``expect_generation`` is a 409 naming the generation; nothing changes.

    Given a session at generation 1, when a prompt expects 0, then it gets conflict (409)
    with the current generation in the details, and no record, event or turn follows. An
    aborted turn leaves the generation where it was; the next commit makes it 2, and a
    prompt still expecting 1 is refused. A new session expecting a generation is unknown.
    """
    watch = await Session.watch(nc, "gen")
    await send(nc, "gen", "one")
    assert (await watch.commits(1))[0]["generation"] == 1
    before = await records(nc, "gen")

    error = await watch.error(await send(nc, "gen", "stale", expect_generation=0))
    assert error["code"] == "conflict" and error["status"] == 409
    assert error["details"] == {"generation": 1, "expected": 0}
    assert await records(nc, "gen") == before
    assert len(watch.of("accepted")) == 1 and len(node.fake.requests) == 1
    assert node.host.runners["gen"].state.pending == []

    gate = node.fake.hold("gen", after=1)
    await send(nc, "gen", "two", expect_generation=1)
    await gate.wait_reached()
    await abort(nc, "gen")
    assert (await watch.aborted())[0]["generation"] == 1
    await send(nc, "gen", "three", expect_generation=1)
    assert (await watch.commits(2))[1]["generation"] == 2

    error = await watch.error(await send(nc, "gen", "late", expect_generation=1))
    assert error["code"] == "conflict" and error["details"]["generation"] == 2
    assert node.host.runners["gen"].state.generation == 2

    fresh = await Session.watch(nc, "gen-new")
    error = await fresh.error(await send(nc, "gen-new", "hi", expect_generation=3))
    assert error["code"] == "unknown_session" and error["status"] == 404


# -- 5. abort -----------------------------------------------------------------------------
async def test_abort_stops_within_one_token_records_provisional(node: FakeNode, nc: Client):
    """An abort stops the turn at once and records its partial text; no commit, no banking.

    Given a turn held after two tokens, when the agent requests an abort, then the reply
    comes once the provisional (partial text, finish ``aborted``) and abort records are in
    the log; ``provisional`` and ``aborted`` carry ``Infer-Aborted: 1``; no token follows
    the cancel; the generation stays; and the bank committer is never asked to bank it.
    """
    watch = await Session.watch(nc, "ab")
    banked = await EventCollector.start(nc, S.bank_commit())
    await send(nc, "ab", "warm up")
    await watch.commits(1)
    gate = node.fake.hold("ab", after=2, tokens=("par", "tial", " never", " sent"))
    await send(nc, "ab", "stop me")
    turn = await gate.wait_reached()

    reply = await abort(nc, "ab")
    assert reply.aborted and reply.turn_id == turn
    log = [r for r in await records(nc, "ab") if getattr(r, "turn_id", None) == turn]
    prov, ended = log
    assert isinstance(prov, ProvisionalRecord) and isinstance(ended, AbortRecord)
    assert prov.message.content == "partial" and ended.reason == "client"
    assert [c.turn_id for c in node.fake.cancels] == [turn]

    await watch.aborted()
    for kind in ("provisional", "aborted"):
        (msg,) = watch.msgs(kind)
        assert (msg.headers or {}).get(ABORTED_HEADER) == "1"
    provisional, aborted = watch.of("provisional")[0], watch.of("aborted")[0]
    assert provisional["text"] == "partial" and provisional["finish_reason"] == "aborted"
    assert aborted["generation"] == 1 and aborted["provisional_id"] == prov.id
    tokens = [e["text"] for e in watch.of("token") if e["turn_id"] == turn]
    assert tokens == ["par", "tial"]
    assert not [c for c in watch.of("commit") if c["turn_id"] == turn]
    assert not [d for d in watch.of("done") if d["turn_id"] == turn]

    await send(nc, "ab", "after")  # a later commit is the barrier for any bank request
    await watch.commits(2)
    await banked.wait_until(lambda ms: len(ms) >= 2)
    assert [json.loads(m.data)["generation"] for m in banked.messages] == [1, 2]
    assert turn not in {json.loads(m.data)["turn_id"] for m in banked.messages}
    assert (await abort(nc, "ab")).aborted is False  # nothing runs now


async def test_abort_of_a_turn_the_engine_finishes_anyway_commits_nothing(
    node: FakeNode, nc: Client
):
    """An abort that reaches the engine too late still leaves the turn uncommitted.

    Given a turn whose engine ignores the cancel (it was queued for a slot, or its result
    is already on the way), when the agent aborts it, then the reply waits for the turn's
    end and says aborted; the whole text becomes the provisional, with no done or commit.
    """
    watch = await Session.watch(nc, "late")
    gate = node.fake.hold("late", after=2, tokens=("whole", " answer"), ignore_cancel=True)
    await send(nc, "late", "question")
    turn = await gate.wait_reached()
    aborting = asyncio.ensure_future(abort(nc, "late"))
    await node.fake.wait_cancel(turn)
    assert not aborting.done()
    gate.release()
    reply = await aborting
    assert reply.aborted and reply.turn_id == turn
    assert watch.of("provisional")[0]["text"] == "whole answer"
    assert (await watch.aborted())[0]["generation"] == 0
    assert watch.of("done") == [] and watch.of("commit") == []
    assert node.host.runners["late"].state.generation == 0


# -- 6. retry -----------------------------------------------------------------------------
async def test_retry_supersedes_provisional(node: FakeNode, nc: Client):
    """A retry runs from the last committed checkpoint; its commit names the provisional.

    Given an aborted turn, when a prompt with no messages asks for a retry, then the turn
    sees the committed history and the aborted question (never the partial text), answers
    that question, and its commit record and event name the provisional it supersedes.
    """
    watch = await Session.watch(nc, "re")
    await send(nc, "re", "one")
    await watch.commits(1)
    gate = node.fake.hold("re", after=1)
    two = (await watch.accepted(await send(nc, "re", "two")))["message_ids"]
    await gate.wait_reached()
    await abort(nc, "re")
    provisional = (await watch.aborted())[0]["provisional_id"]

    await watch.accepted(await retry(nc, "re"))
    commit = (await watch.commits(2))[1]
    assert commit["supersedes"] == provisional and commit["parent_ids"] == two
    assert commit["generation"] == 2
    assert [m.content for m in node.fake.requests[-1].messages] == ["one", "re: one", "two"]
    log = await records(nc, "re")
    (record,) = [r for r in log if isinstance(r, CommitRecord) and r.turn_id == commit["turn_id"]]
    assert record.supersedes == provisional
    assert any(isinstance(r, ProvisionalRecord) and r.id == provisional for r in log)


async def test_unretried_abort_stays_in_history(node: FakeNode, nc: Client):
    """Without a retry, the provisional stays as the final ABORTED turn in the history.

    Given an aborted turn, when the agent asks something new instead, then the new turn
    answers only the new question, supersedes nothing, and keeps the aborted question as
    context without the partial text; the history shows the provisional as ABORTED, and a
    retry now finds nothing to retry.
    """
    watch = await Session.watch(nc, "un")
    await send(nc, "un", "one")
    await watch.commits(1)
    gate = node.fake.hold("un", after=1)
    await send(nc, "un", "two")
    await gate.wait_reached()
    await abort(nc, "un")
    provisional = (await watch.aborted())[0]["provisional_id"]

    three = (await watch.accepted(await send(nc, "un", "three")))["message_ids"]
    commit = (await watch.commits(2))[1]
    assert commit["parent_ids"] == three and commit["supersedes"] is None
    seen = [m.content for m in node.fake.requests[-1].messages]
    assert seen == ["one", "re: one", "two", "three"]
    async with InfernodeClient(node.url, nc=nc) as client:
        history = await client.history("un")
    aborted = [r for r in history.records if r.kind == "provisional"]
    assert [(r.id, r.status, r.content) for r in aborted] == [(provisional, "ABORTED", "par")]
    assert [r.status for r in history.records if r.kind == "assistant"] == ["committed"] * 2
    error = await watch.error(await retry(nc, "un"))
    assert error["code"] == "bad_request"


# -- 7. status ----------------------------------------------------------------------------
async def test_status_idle_restored_on_every_failure_path(node: FakeNode, nc: Client, nats_server):
    """Status goes busy then idle on engine error, overflow, abort, shutdown and no engine.

    Given a turn that fails in the engine, overflows the context, is aborted, is cut by a
    node shutdown, or finds no engine, then a typed error or abort is published and the
    session's last status is idle; a shutdown-cut turn is answered after the restart, its
    commit superseding the shutdown's provisional; a turn that found no engine is run again
    by the node, with no retry prompt, once an engine answers.
    """
    async def ends_idle(watch: Session) -> dict[str, Any]:
        status = await watch.idle()
        assert [s["state"] for s in watch.of("status")].count("busy") >= 1
        return status

    err = await Session.watch(nc, "err")
    node.fake.fail("err")
    await send(nc, "err", "boom")
    await err.until(lambda s: bool(s.of("error")) and bool(s.of("aborted")))
    error = err.of("error")[0]
    assert error["code"] == "internal" and error["status"] == 500 and error["turn_id"]
    assert err.of("aborted")[0]["reason"] == "engine_error"
    await ends_idle(err)
    await send(nc, "err", "fine")
    assert (await err.commits(1))[0]["generation"] == 1

    ovf = await Session.watch(nc, "ovf")
    node.fake.fail("ovf", ErrorCode.CONTEXT_OVERFLOW)
    await send(nc, "ovf", "too long")
    await ovf.until(lambda s: bool(s.of("aborted")))
    error = ovf.of("error")[0]
    assert error["code"] == "context_overflow" and error["status"] == 422
    assert error["details"]["n_ctx"] > 0
    assert (await ends_idle(ovf))["pending"] == 0  # the input that cannot fit is dropped

    abt = await Session.watch(nc, "abt")
    gate = node.fake.hold("abt")
    await send(nc, "abt", "wait")
    await gate.wait_reached()
    await abort(nc, "abt")
    await ends_idle(abt)

    bye = await Session.watch(nc, "bye")
    gate = node.fake.hold("bye")
    asked = (await bye.accepted(await send(nc, "bye", "cut short")))["message_ids"]
    await gate.wait_reached()
    await node.stop()
    assert bye.of("aborted")[0]["reason"] == "shutdown"
    await ends_idle(bye)
    provisional = bye.of("aborted")[0]["provisional_id"]

    async with FakeNode(nats_server.url, heartbeat_s=0) as again:
        commit = (await bye.commits(1))[0]
        assert commit["parent_ids"] == asked and commit["supersedes"] == provisional
        await ends_idle(bye)
        await again.fake.stop()  # no engine answers now
        lost = await Session.watch(nc, "lost")
        await send(nc, "lost", "anyone?")
        await lost.until(lambda s: bool(s.of("aborted")))
        assert lost.of("aborted")[0]["reason"] == "unavailable" and lost.of("error") == []
        assert (await ends_idle(lost))["pending"] == 1  # kept, and run again by itself
        back = FakeEngine(await again._connect("engine-back"), again.subjects)
        await back.start()
        try:
            assert (await lost.commits(1, timeout=40))[0]["generation"] == 1
        finally:
            await back.stop()


# -- 8. delete ----------------------------------------------------------------------------
async def test_delete_waits_for_commit_then_404_and_410(nats_server, nc: Client, logs: LogWatch):
    """Deletion waits for the in-flight commit; then 410 while remembered, 404 after.

    Given a turn whose result is already on its way (it ignores the cancel), when the
    session is deleted, then the delete answers only after the turn's commit; prompts
    meanwhile are refused gone (410) and not recorded; afterwards prompts, aborts and
    history are gone (410) and the log keeps only the delete record. Once the bounded
    tombstones forget the id, aborts, history and prompts expecting a generation are 404.
    """
    async with FakeNode(nats_server.url, heartbeat_s=0, tombstones=1) as node:
        watch = await Session.watch(nc, "del")
        await send(nc, "del", "one")
        await watch.commits(1)
        gate = node.fake.hold("del", after=3, tokens=("a", "b", "c"), ignore_cancel=True)
        await send(nc, "del", "two")
        turn = await gate.wait_reached()
        async with InfernodeClient(node.url, nc=nc) as client:
            deleting = asyncio.ensure_future(client.delete("del"))
            await node.fake.wait_cancel(turn)
            error = await watch.error(await send(nc, "del", "during"))
            assert error["code"] == "gone" and error["status"] == 410
            assert not deleting.done()
            gate.release()
            await deleting
            assert [c["turn_id"] for c in watch.of("commit")][-1] == turn
            assert [r.type for r in await records(nc, "del")] == ["record.delete.v1"]
            assert [f.session for f in node.fake.forgets] == ["del"]

            error = await watch.error(await send(nc, "del", "after"))
            assert error["code"] == "gone"
            for call in (client.abort("del"), client.history("del"), client.delete("del")):
                with pytest.raises(InferError) as gone:
                    await call
                assert gone.value.code == ErrorCode.GONE

            other = await Session.watch(nc, "other")
            await send(nc, "other", "x")
            await other.commits(1)
            await client.delete("other")  # tombstones=1: "del" is forgotten
            for call in (client.abort("del"), client.history("del")):
                with pytest.raises(InferError) as unknown:
                    await call
                assert unknown.value.code == ErrorCode.UNKNOWN_SESSION
            error = await watch.error(await send(nc, "del", "back?", expect_generation=2))
            assert error["code"] == "unknown_session" and error["status"] == 404


# -- logs ---------------------------------------------------------------------------------
BUCKETS = ("queue_ms", "lock_wait_ms", "tokenize_ms", "restore_ms", "prefill_ms", "decode_ms",
           "total_ms", "turn_ms", "overhead_ms")
COUNTS = ("inflight_now", "prompt_tokens", "cached_tokens", "completion_tokens")


async def test_every_turn_logs_chat_start_and_chat_done_with_timing_buckets(
    node: FakeNode, nc: Client, logs: LogWatch
):
    """Given a committed and an aborted turn, each logs chat_start and chat_done with buckets."""
    watch = await Session.watch(nc, "logs")
    await send(nc, "logs", "hello")
    turn = (await watch.commits(1))[0]["turn_id"]
    start = await logs.wait("chat_start", turn=turn)
    assert start["session"] == "logs" and start["inflight_now"] == 1 and start["queue_ms"] >= 0
    done = await logs.wait("chat_done", turn=turn)
    assert done["outcome"] == "committed" and done["session"] == "logs"
    assert all(isinstance(done[k], float | int) and done[k] >= 0 for k in BUCKETS + COUNTS)
    assert done["completion_tokens"] == 2 and done["turn_ms"] >= done["total_ms"]

    gate = node.fake.hold("logs")
    await send(nc, "logs", "again")
    held = await gate.wait_reached()
    await abort(nc, "logs")
    assert (await logs.wait("chat_done", turn=held))["outcome"] == "aborted"
    assert logs.named("chat_start", turn=held)


async def test_the_done_event_and_the_log_line_report_one_queue_time(make_node, logs: LogWatch):
    """queue_ms is measured once, by the runner: the done event carries the log line's value."""
    node = await make_node(heartbeat_s=0)
    async with InfernodeClient(node.url) as client:
        result = await client.ask("queued", "hello", max_tokens=4, timeout=60)
    line = await logs.wait("chat_done", turn=result.turn_id)
    assert line["queue_ms"] == round(result.timings.queue_ms, 2)


async def test_stats_heartbeat_logs_sessions_inflight_and_rss(
    nats_server, nc: Client, logs: LogWatch
):
    """Given a heartbeat period, the host logs sessions, turns in flight and RSS every period."""
    async with FakeNode(nats_server.url, heartbeat_s=0.05) as node:
        watch = await Session.watch(nc, "beat")
        gate = node.fake.hold("beat")
        await send(nc, "beat", "hi")
        await gate.wait_reached()
        beat = await logs.wait("stats_heartbeat", sessions=1, inflight=1)
        assert beat["rss_bytes"] > 0 and beat["pending"] == 0
        gate.release()
        await watch.commits(1)
        await logs.wait("stats_heartbeat", sessions=1, inflight=0)


# -- the real engine ----------------------------------------------------------------------
async def test_abort_and_retry_on_the_real_engine(make_node, nc: Client):
    """On the tiny GGUF model: abort stops the turn mid-stream, the retry starts afresh.

    Given a long greedy turn, when it is aborted after its first token, then the provisional
    holds exactly the streamed text, fewer tokens than asked for, and the generation stays 0;
    when the agent retries, then the commit supersedes that provisional and, greedy from the
    committed checkpoint, its text begins with the aborted partial text.
    """
    node = await make_node(threads=1)
    watch = await Session.watch(nc, "real")
    key = await send(nc, "real", "tell me everything", sampling=GREEDY, max_tokens=1800)
    asked = (await watch.accepted(key))["message_ids"]
    await watch.until(lambda s: bool(s.of("token")), timeout=30)
    async with InfernodeClient(node.url, nc=nc) as client:
        reply = await client.abort("real")
        assert reply.aborted
        aborted = (await watch.aborted())[0]
        assert aborted["generation"] == 0 and aborted["reason"] == "client"
        provisional = watch.of("provisional")[0]
        streamed = [e["text"] for e in watch.of("token") if e["turn_id"] == reply.turn_id]
        assert provisional["text"] == "".join(streamed) and 0 < len(streamed) < 1800
        assert (watch.msgs("aborted")[0].headers or {}).get(ABORTED_HEADER) == "1"
        assert watch.of("commit") == []

        await watch.accepted(await retry(nc, "real"))
        commit = (await watch.commits(1, timeout=60))[0]
        done = watch.of("done")[0]
        assert commit["supersedes"] == aborted["provisional_id"]
        assert commit["parent_ids"] == asked and commit["generation"] == 1
        partial = provisional["text"]
        assert done["text"].startswith(partial) and len(done["text"]) > len(partial)
        history = await client.history("real")
    kinds = [(r.kind, r.status) for r in history.records if r.kind in ("provisional", "assistant")]
    assert kinds == [("provisional", "ABORTED"), ("assistant", "committed")]


async def test_a_turn_whose_result_the_bus_lost_is_rerun_without_a_retry_prompt(
    nats_server, nc: Client
):
    """Given an engine whose result never arrives (lost in a reconnect), when the runner asks
    whether the turn still runs and hears no, then the cut turn is recorded as aborted
    (reason ``unavailable``, no error event), the session goes idle with its prompt kept,
    and the node runs it again by itself: one commit answers it, superseding the cut turn."""
    from tests.fake_engine import Script

    async with FakeNode(nats_server.url, heartbeat_s=0, turn_probe_s=0.2) as node:
        lost = await Session.watch(nc, "lost")
        node.fake.script("lost", Script(tokens=("gone",), lose_reply=True))
        asked = (await lost.accepted(await send(nc, "lost", "hello?")))["message_ids"]
        commit = (await lost.commits(1, timeout=20))[0]
        assert commit["parent_ids"] == asked and commit["generation"] == 1
        aborted = lost.of("aborted")
        assert [a["reason"] for a in aborted] == ["unavailable"] and lost.of("error") == []
        assert commit["supersedes"] == aborted[0]["provisional_id"]
        kinds = lost.kinds()
        between = kinds[kinds.index("aborted"):len(kinds) - kinds[::-1].index("started")]
        statuses = [e for e in lost.of("status") if e["state"] == "idle"]
        assert "status" in between and statuses[0]["pending"] == 1
        assert len(node.fake.requests) == 2
        assert (await lost.idle())["pending"] == 0
