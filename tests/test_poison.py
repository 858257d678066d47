"""Poison prompts: a schema that would crash the grammar compiler is refused by its bound and
never takes the node down; a turn that crashed the node again and again is set aside."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from actors.engine.constraints import SCHEMA_MAX_DEPTH, schema_bounds_problem, schema_source
from actors.schema_worker import SchemaWorker
from actors.session.records import abort_records
from actors.session.state import CRASH_LIMIT, CRASHED, apply, rebuild
from node.client import InfernodeClient
from node.nats_server import EmbeddedNats
from schemas.chat import ChatMessage, SamplingParams
from schemas.errors import InferError
from schemas.messages import PromptRequest
from schemas.records import TurnStartRecord, UserRecord
from schemas.subjects import Subjects
from tests.helpers import EventCollector
from tests.support.node_process import READY, NodeProcess

GREEDY = SamplingParams(temperature=0.0)
S = Subjects()


def ref_chain(n: int) -> dict[str, object]:
    """A schema whose root reaches a string through ``n`` chained ``$ref``s (~35 bytes each:
    2,500 is ~88 KiB, well inside a prompt)."""
    defs: dict[str, object] = {f"a{i}": {"$ref": f"#/$defs/a{i + 1}"} for i in range(n)}
    defs[f"a{n}"] = {"type": "string"}
    return {"$ref": "#/$defs/a0", "$defs": defs}


def json_format(schema: dict[str, object]) -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": "chain", "schema": schema}}


def test_schema_bounds_name_the_depth_limit_and_let_a_recursive_schema_pass():
    """A long $ref chain is past the depth bound (named); a self-referencing tree is not."""
    assert f"more than {SCHEMA_MAX_DEPTH} levels" in schema_bounds_problem(ref_chain(2500))
    assert schema_bounds_problem(ref_chain(SCHEMA_MAX_DEPTH // 2)) == ""
    tree = {"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {
        "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}}}
    assert schema_bounds_problem(tree) == ""


async def test_a_schema_that_crashes_the_compiler_is_a_refusal_and_the_next_one_compiles():
    """Past the bounds on purpose, the compiler's native crash kills only its own process:
    the question is answered with the crash and the next schema compiles in a fresh one."""
    worker = SchemaWorker()
    try:
        crashed = await worker.problem(schema_source(ref_chain(5000)))
        assert "crashed" in crashed and worker.restarts == 1
        assert await worker.problem(schema_source({"type": "object"})) == ""
    finally:
        await worker.close()


@pytest.mark.timeout(180)
async def test_a_node_refuses_a_ref_chain_schema_naming_the_limit_and_still_serves(
    nats_server: EmbeddedNats, tiny_model: Path, tmp_path: Path
):
    """Given `infernode up`, a response_format chaining 2,500 $refs is a 400 naming the depth
    limit, and the same node answers the next prompt (it used to die of a stack overflow)."""
    node = await NodeProcess.up(nats_server.url, tmp_path / "node", tiny_model)
    try:
        async with InfernodeClient(nats_server.url) as client:
            with pytest.raises(InferError) as refused:
                await client.complete("deep", "hi", response_format=json_format(ref_chain(2500)),
                                      max_tokens=4, timeout=60)
            assert refused.value.status == 400
            assert f"more than {SCHEMA_MAX_DEPTH} levels" in refused.value.message
            served = await client.complete("deep", "still there?", sampling=GREEDY,
                                           max_tokens=4, timeout=60)
        assert served.commit is not None and node.proc.returncode is None
    finally:
        await node.terminate()


def _cut(turn: str, question: UserRecord) -> list[object]:
    start = TurnStartRecord(id=turn, parent_ids=(question.id,), input_ids=(question.id,), ts=0.0)
    return [start, *abort_records(turn, (question.id,), "", "node_restart")]


def test_the_third_turn_a_nodes_death_cuts_is_set_aside_and_its_input_dropped():
    """Two cuts (node_restart) run the input again; the third closes as CRASHED, after
    which nothing waits for a turn; a graceful stop's abort counts nothing."""
    question = UserRecord(id="u1", message=ChatMessage(role="user", content="boom"), ts=0.0)
    state = rebuild("s", [question, *_cut("t1", question), *_cut("t2", question)])
    assert state.wants_turn()
    apply(state, TurnStartRecord(id="t3", parent_ids=("u1",), input_ids=("u1",), ts=0.0))
    assert CRASH_LIMIT == 3 and state.interrupted_reason() == CRASHED
    for record in abort_records("t3", ("u1",), "", CRASHED):
        apply(state, record)
    assert not state.wants_turn() and not state.pending and not state.history
    calm = rebuild("s", [question, *_cut("t1", question)])
    for record in abort_records("t2", ("u1",), "", "shutdown"):  # a turn cut by SIGTERM
        apply(calm, record)
    apply(calm, TurnStartRecord(id="t3", parent_ids=("u1",), input_ids=("u1",), ts=0.0))
    assert calm.interrupted_reason() == "node_restart"


def kinds(events: EventCollector, kind: str) -> list[dict]:
    return [json.loads(m.data) for m in events.messages if m.subject.endswith("." + kind)]


@pytest.mark.timeout(300)
async def test_a_turn_cut_by_three_sigkills_is_set_aside_with_an_error_and_the_node_serves_on(
    nats_server: EmbeddedNats, nc, tiny_model: Path, tmp_path: Path
):
    """Given a turn that is streaming each time its node is SIGKILLed, the first two
    restarts run it again and the third sets it aside: an `error` event, an abort recorded
    as repeated_crash, no fourth run; the next prompt is answered without it."""
    url, data, js = nats_server.url, tmp_path / "node", nc.jetstream()
    events = await EventCollector.start(nc, S.events_all("poison"))
    node = await NodeProcess.up(url, data, tiny_model, "--ctx", "4096")
    try:
        long = PromptRequest(messages=(ChatMessage(role="user", content="talk at length"),),
                             sampling=GREEDY, max_tokens=8000)
        await js.publish(S.prompt("poison"), long.model_dump_json().encode())
        for cut in range(1, CRASH_LIMIT + 1):
            await events.wait_until(lambda ms, n=cut: len(kinds(events, "started")) >= n, 60)
            turn = kinds(events, "started")[-1]["turn_id"]
            await events.wait_until(
                lambda ms, t=turn: any(e["turn_id"] == t for e in kinds(events, "token")), 60)
            await node.kill()
            node = await NodeProcess.up(url, data, tiny_model, "--ctx", "4096")
        await events.wait_until(lambda ms: kinds(events, "error"), timeout=60)
        (error,) = kinds(events, "error")
        assert error["turn_id"] == turn and error["code"] == "internal"
        assert "set aside" in error["message"]
        async with InfernodeClient(url) as client:
            after = await client.complete("poison", "hello again", sampling=GREEDY,
                                          max_tokens=4, timeout=60)
            history = await client.history("poison")
    finally:
        await node.terminate()
    started = kinds(events, "started")
    assert len(started) == CRASH_LIMIT + 1  # three cut runs and the new prompt's, no fourth
    reasons = [r.reason for r in history.records if r.kind == "abort"]
    assert reasons == ["node_restart"] * (CRASH_LIMIT - 1) + [CRASHED]
    (poisoned, fresh) = [r.id for r in history.records if r.kind == "user"]
    assert after.commit is not None and after.commit.parent_ids == (fresh,)


def test_a_deep_part_reached_again_from_deep_down_counts_its_depth_from_there():
    """A $ref chain walked once from the root still counts as deep when a second path
    reaches it from far down (the compiler may meet it there first)."""
    half = SCHEMA_MAX_DEPTH // 2 + 8
    schema = ref_chain(half)
    schema["properties"] = {"deep": ref_chain(half)["$defs"]["a0"]}  # a shallow way in first
    defs = schema["$defs"]
    assert isinstance(defs, dict)
    for i in range(half):  # a second, deep way in: b0 -> ... -> b<half> -> a0
        defs[f"b{i}"] = {"$ref": f"#/$defs/b{i + 1}"}
    defs[f"b{half}"] = {"$ref": "#/$defs/a0"}
    schema["items"] = {"$ref": "#/$defs/b0"}
    assert schema_bounds_problem(ref_chain(half)) == ""
    assert "more than" in schema_bounds_problem(schema)


async def _spawn(url: str, data: Path, model: Path) -> NodeProcess:
    """`infernode up` started, not waited for: a prompt left in the intake is pulled at once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERNODE_")}
    env["INFERNODE_THREADS"] = "1"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node.cli", "up", "--nats-url", url, "--data-dir", str(data),
        "--model", str(model), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    return NodeProcess(proc)


@pytest.mark.timeout(300)
async def test_a_prompt_whose_admission_three_sigkills_cut_is_set_aside_with_an_error(
    nats_server: EmbeddedNats, nc, tiny_model: Path, tmp_path: Path
):
    """Given a prompt in admission each time its node is SIGKILLed (its schema is being
    checked: the compiler's process is starting), the fourth delivery sets it aside with an
    `error` event instead of admitting it, and the node serves on."""
    url, data, js = nats_server.url, tmp_path / "node", nc.jetstream()
    marks: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_mark(msg) -> None:  # type: ignore[no-untyped-def]
        marks.put_nowait(msg.data)

    await nc.subscribe(S.intake_mark_all(), cb=on_mark)
    events = await EventCollector.start(nc, S.events_all("stuck"))
    node = await NodeProcess.up(url, data, tiny_model)
    prompt = PromptRequest.model_validate({
        "messages": [{"role": "user", "content": "json please"}], "max_tokens": 4,
        "response_format": json_format({"type": "object"}),
    })
    await js.publish(S.prompt("stuck"), prompt.model_dump_json().encode())
    try:
        for cut in range(1, CRASH_LIMIT + 1):
            # A mark's first try is seen too (the subject is plain NATS), kept or refused.
            while await asyncio.wait_for(marks.get(), 60) != str(cut).encode():
                pass
            await node.kill()  # the prompt is in flight: marked, not yet settled
            node = await _spawn(url, data, tiny_model)
        await events.wait_until(lambda ms: kinds(events, "error"), timeout=60)
        (error,) = kinds(events, "error")
        assert error["code"] == "internal" and "set aside" in error["message"]
        await node.wait_for_line(READY, timeout=60)
        async with InfernodeClient(url) as client:
            after = await client.complete("stuck", "hello", sampling=GREEDY, max_tokens=4,
                                          timeout=60)
    finally:
        await node.terminate()  # a stopped node has taken its marks away
    assert after.commit is not None
    assert len(kinds(events, "accepted")) == 1  # only the later prompt was ever recorded
    assert (await js.stream_info(S.intake_marks_stream)).state.messages == 0
