"""A session that outlives its context holds its window in RAM, not its log: the messages the
window passed are dropped from the runner's state (counted, their tool calls remembered) and
read back from the record log only for what needs them, a ``refuse`` turn and the history."""

from __future__ import annotations

import gc
import sys
from types import BuiltinFunctionType, FunctionType, ModuleType

from actors.session.host import RunnerHost
from actors.session.state import SessionState, apply
from node.client import InfernodeClient
from schemas.chat import ChatMessage, FunctionCall, ToolCall
from schemas.messages import PromptRequest
from schemas.records import AssistantRecord, CommitRecord, TurnStartRecord, UserRecord
from tests.support.engine_requests import engine_requests

SYSTEM = ChatMessage(role="system", content="You are the window keeper.")
WINDOW_TURNS = 6


def turn_records(n: int, window_from: str | None) -> list:
    """The records of turn ``n``: its question, start, answer (a tool call every 5th turn of
    the first 50: each call id is remembered, a tool result may answer it)."""
    question = ChatMessage(role="user", content=f"question {n}: how do windows move on? " * 3)
    calls = (ToolCall(id=f"call_{n}", function=FunctionCall(name="f", arguments="{}")),)
    answer = ChatMessage(role="assistant", content=f"answer {n}, the window moves on " * 3,
                         tool_calls=calls if n % 5 == 0 and n < 50 else None)
    u, t, a = f"u{n}", f"t{n}", f"a{n}"
    return [
        UserRecord(id=u, message=question, ts=0.0),
        TurnStartRecord(id=t, parent_ids=(u,), input_ids=(u,), ts=0.0),
        AssistantRecord(id=a, turn_id=t, message=answer, parent_ids=(u,), finish_reason="stop",
                        token_ids=tuple(range(1000 + n, 1040 + n)), model_id="m", ts=0.0),
        CommitRecord(id=f"c{n}", turn_id=t, assistant_id=a, generation=n + 1, parent_ids=(u,),
                     window_from=window_from, ts=0.0),
    ]


def long_session(turns: int) -> SessionState:
    """A session whose window keeps its last ``WINDOW_TURNS`` turns, replayed record by record."""
    state = SessionState("long")
    apply(state, UserRecord(id="sys", message=SYSTEM, reply=False, ts=0.0))
    for n in range(turns):
        window = f"u{n - WINDOW_TURNS + 1}" if n >= WINDOW_TURNS else None
        for record in turn_records(n, window):
            apply(state, record)
    return state


_NOT_STATE = (type, ModuleType, FunctionType, BuiltinFunctionType)


def held_bytes(root: object) -> int:
    """Bytes of every object ``root`` reaches (classes, functions and modules left out): what
    the state keeps alive, counted the same way in any process, whatever else it allocated."""
    seen: set[int] = set()
    stack, total = [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _NOT_STATE):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def retained(turns: int) -> tuple[int, SessionState]:
    """Bytes a session of ``turns`` turns keeps reachable, and the session."""
    state = long_session(turns)
    return held_bytes(state), state


def test_a_long_sessions_state_keeps_the_same_bytes_at_400_turns_as_at_100():
    """Past the window, a turn adds nothing the state keeps: the held history is the system
    head and the window, and the bytes retained stay flat from 100 to 400 turns."""
    small, short = retained(100)
    big, long = retained(400)
    assert len(long.history) == len(short.history) == 1 + 2 * WINDOW_TURNS
    assert big <= small * 1.1, f"{small} bytes at 100 turns, {big} at 400"


def test_a_dropped_history_still_counts_in_the_whole_conversation():
    """The messages dropped are counted where the whole conversation is indexed: its
    length, the window's start, the record at an index, and the calls a result may answer."""
    state = long_session(400)
    whole = 1 + 2 * 400
    assert state.history_len() == whole
    assert state.dropped == 2 * (400 - WINDOW_TURNS) and state.dropped_turns == 400 - WINDOW_TURNS
    assert state.window_start() == 1 + state.dropped
    assert state.history[0].message == SYSTEM and state.history[1].record_id == state.window_from
    assert state.record_at([], state.window_start()) == state.window_from
    assert state.record_at([], whole - 1) == "a399"
    assert state.record_at([], 0) == "sys" and state.record_at([], 5) == state.window_from
    assert {"call_0", "call_45"} <= state.call_ids()


def test_a_state_replayed_for_the_whole_history_keeps_every_message():
    """``keep_history`` (the replay a ``refuse`` turn reads) drops nothing."""
    state = SessionState("long", keep_history=True)
    for record in turn_records(0, None) + turn_records(1, "u1"):
        apply(state, record)
    assert [h.record_id for h in state.history] == ["u0", "a0", "u1", "a1"]


async def test_a_long_session_on_a_node_holds_its_window_and_refuse_reads_the_log_back(
    make_node, nc
):
    """Through a node at --ctx 256: once the window moved the runner holds the system head
    and the window only, and a ``refuse`` turn still sends the whole conversation, read back
    from the record log."""
    node = await make_node(n_ctx=256)
    sent = await engine_requests(nc, node)
    host = next(a for a in node.actors if isinstance(a, RunnerHost))
    async with InfernodeClient(node.url) as client:
        await client.ask("mem", [SYSTEM, ChatMessage(role="user", content="start")],
                         max_tokens=16)
        for n in range(30):
            await client.ask("mem", f"message {n}: tell me more about windows", max_tokens=16)
        state = host.runners["mem"].state
        assert state.dropped > 0 and state.history_len() == 3 + 2 * 30
        last = sent[-1]
        # the head and the window (which its commit may have moved on), and its answer
        assert len(state.history) <= len(last.messages) + 1 and state.dropped >= last.omitted
        prompt = PromptRequest(messages=(ChatMessage(role="user", content="refuse now"),),
                               max_tokens=16, overflow="refuse")
        await client.nc.request(client.subjects.ask("mem"), prompt.model_dump_json().encode(),
                                timeout=60)
        history = await client.history("mem")
    whole = sent[-1]
    assert whole.params.overflow == "refuse" and whole.omitted == 0
    logged = [r for r in history.records if r.role is not None and r.kind != "provisional"]
    assert [m.content for m in whole.messages] == [r.content for r in logged]
