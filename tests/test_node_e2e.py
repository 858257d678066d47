"""One prompt travels the whole way on the real GGUF engine and the tiny model."""

from __future__ import annotations

import json

import pytest

from node.client import InfernodeClient, TurnResult
from schemas.chat import ChatMessage, SamplingParams
from schemas.messages import PromptRequest
from schemas.subjects import Subjects
from tests.helpers import EventCollector

GREEDY = SamplingParams(temperature=0.0)
S = Subjects()


async def _ask(url: str, session: str, text: str, max_tokens: int = 12) -> TurnResult:
    async with InfernodeClient(url) as client:
        return await client.complete(
            session, text, sampling=GREEDY, max_tokens=max_tokens, timeout=60
        )


async def test_prompt_yields_accepted_started_tokens_done_commit_in_order(make_node, nc):
    """A prompt yields accepted, started, tokens, done, commit; streamed text is committed."""
    node = await make_node()
    events = await EventCollector.start(nc, S.events_all("e2e"))
    prompt = PromptRequest(messages=(ChatMessage(role="user", content="hello world"),),
                           sampling=GREEDY, max_tokens=10)
    await nc.jetstream().publish(S.prompt("e2e"), prompt.model_dump_json().encode())
    await events.wait_until(lambda ms: any(m.subject.endswith(".commit") for m in ms), timeout=60)
    kinds = [m.subject.rsplit(".", 1)[-1] for m in events.messages]
    flow = [k for k in kinds if k in {"accepted", "started", "token", "done", "commit"}]
    first_token, last_token = flow.index("token"), len(flow) - 1 - flow[::-1].index("token")
    assert flow[:2] == ["accepted", "started"]
    assert first_token == 2 and flow[last_token + 1 :] == ["done", "commit"]
    streamed = "".join(json.loads(m.data)["text"] for m in events.messages
                       if m.subject.endswith(".token"))
    done = next(json.loads(m.data) for m in events.messages if m.subject.endswith(".done"))
    assert streamed == done["text"] and streamed
    async with InfernodeClient(node.url) as client:
        history = await client.history("e2e")
    assistant = [r for r in history.records if r.kind == "assistant"]
    assert [a.content for a in assistant] == [streamed]


async def test_greedy_decoding_is_deterministic_across_two_fresh_nodes(make_node):
    """Two nodes started fresh give the same greedy text for the same prompt."""
    first = await make_node()
    a = await _ask(first.url, "det", "the agent said hello")
    await first.stop()
    second = await make_node(fresh_server=True)
    b = await _ask(second.url, "det", "the agent said hello")
    assert a.text and a.text == b.text


async def test_turn_two_reuses_the_prefix_and_matches_a_cold_recompute(make_node):
    """Turn 2 reports cached tokens; a node without the cache gives the same greedy text."""
    warm = await make_node()
    await _ask(warm.url, "multi", "first question")
    warm2 = await _ask(warm.url, "multi", "second question")
    assert warm2.done is not None
    assert warm2.done.usage.cached_tokens > 0
    assert warm2.done.cache.source == "slot"
    await warm.stop()

    cold = await make_node(fresh_server=True)
    await _ask(cold.url, "multi", "first question")
    await cold.stop()  # the restart empties slots and the RAM bank; the record log stays
    restarted = await make_node(url=cold.url)
    cold2 = await _ask(restarted.url, "multi", "second question")
    assert cold2.done is not None and cold2.done.usage.cached_tokens == 0
    assert cold2.text == warm2.text


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "invalid prompt"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "bogus": 1}', "bogus"),
        (b'{"messages": [{"role": "robot", "content": "hi"}]}', "role"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', "max_tokens"),
        (b"\xff\xfe\x00garbage", "invalid prompt"),
    ],
)
async def test_malformed_prompt_gets_typed_error_and_node_keeps_serving(make_node, nc, body, needle):
    """A malformed prompt yields a bad_request error event; the next valid prompt is served."""
    node = await make_node()
    errors = await EventCollector.start(nc, S.events("bad", "error"))
    await nc.jetstream().publish(S.prompt("bad"), body)
    await errors.wait_until(lambda ms: len(ms) >= 1, timeout=20)
    event = json.loads(errors.messages[0].data)
    assert event["code"] == "bad_request" and event["status"] == 400
    assert needle in event["message"]
    result = await _ask(node.url, "bad", "still there?", max_tokens=4)
    assert result.commit is not None and result.commit.generation == 1


async def test_invalid_session_id_is_rejected_with_a_typed_error(make_node, nc):
    """A prompt on an invalid session id yields an error on the rejected subject."""
    node = await make_node()
    rejected = await EventCollector.start(nc, S.rejected())
    prompt = PromptRequest(messages=(ChatMessage(role="user", content="hi"),))
    await nc.jetstream().publish(S.prompt("x" * 200), prompt.model_dump_json().encode())
    await rejected.wait_until(lambda ms: len(ms) >= 1, timeout=20)
    event = json.loads(rejected.messages[0].data)
    assert event["code"] == "bad_request" and "session id" in event["message"]
    assert (await _ask(node.url, "good", "hi", max_tokens=3)).commit is not None
