"""Agents' own conversation ids as affinity hints, through the official `openai` and
`anthropic` SDKs on the real engine and the tiny model: opencode's ``x-session-id``, Claude
Code's ``x-claude-code-session-id`` and the Responses API's ``prompt_cache_key``. A side
request under the main conversation's id (a title, a summary) leaves the main session its
cache, a request no session extends forks, and requests at once under one id are all
answered."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import openai

from actors.gateway.chain import SESSIONS_PER_HINT, ConversationIndex
from node.client import InfernodeClient
from schemas.subjects import Subjects

GREEDY = {"temperature": 0, "max_tokens": 6}
LONG = 2000
"""Tokens of a turn that is still running when the next request arrives."""
MAIN = "You are a coding agent. Use the tools to edit the project. " * 4
TITLE = "Generate a short title for the conversation the user starts."


async def _gateway(make_node) -> tuple[Any, str]:
    node = await make_node(openai_port=0)
    return node, f"http://127.0.0.1:{node.gateway.port}"


def _openai(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def _chat(system: str, *turns: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system},
            *({"role": "user", "content": t} for t in turns)]


async def _users(url: str, session: str) -> list[str]:
    async with InfernodeClient(url) as c:
        history = await c.history(session)
    return [r.content for r in history.records if r.role == "user"]


# -- opencode: chat completions under x-session-id ----------------------------------------
async def _opencode(client: openai.AsyncOpenAI, messages: list[Any], **extra: Any) -> Any:
    raw = await client.chat.completions.with_raw_response.create(
        model="any", messages=messages, extra_headers={"x-session-id": "ses_opencode1"},
        **{**GREEDY, **extra})
    return raw.headers["x-session-id"], raw.parse()


async def test_a_title_request_under_the_hint_leaves_the_main_conversation_its_cache(
    make_node,
):
    """opencode's title request goes first under the id its main conversation uses; the
    main conversation's second turn still continues its own session, on its cached prefix."""
    node, base = await _gateway(make_node)
    client = _openai(base)
    title, _ = await _opencode(client, _chat(TITLE, "fix the failing test"))
    messages: list[Any] = _chat(MAIN, "fix the failing test")
    main, one = await _opencode(client, messages)
    summary, _ = await _opencode(client, _chat("Summarize the conversation.", "it went well"))
    messages += [one.choices[0].message.model_dump(exclude_none=True),
                 {"role": "user", "content": "now run it"}]
    again, two = await _opencode(client, messages)
    assert again == main and len({title, main, summary}) == 3
    assert two.usage.prompt_tokens_details.cached_tokens == (
        one.usage.prompt_tokens + one.usage.completion_tokens)
    assert await _users(node.url, main) == ["fix the failing test", "now run it"]


async def test_a_divergent_request_under_x_session_id_forks_while_the_first_runs(make_node):
    """A request whose history the hint's running session does not hold (opencode's main
    turn sent while its title turn runs) forks and is answered 200; so is the first."""
    node, base = await _gateway(make_node)
    client = _openai(base)
    stream = await client.chat.completions.create(
        model="any", messages=_chat(TITLE, "start"), stream=True, temperature=0,
        max_tokens=LONG, extra_headers={"x-session-id": "ses_opencode1"})
    chunks = aiter(stream)
    while not (await anext(chunks)).choices[0].delta.content:
        pass  # the title turn is running
    fork, answer = await _opencode(client, _chat(MAIN, "fix the failing test"))
    rest = [c async for c in chunks]
    assert answer.choices[0].message.content and fork.startswith("ses_opencode1-")
    assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert await _users(node.url, "ses_opencode1") == ["start"]
    assert await _users(node.url, fork) == ["fix the failing test"]


async def test_two_first_requests_at_once_under_one_x_session_id_are_both_answered(
    make_node,
):
    """opencode sends its title request and its main conversation's first turn at once
    under one id: both are answered, in two sessions, and the main turn's next turn
    continues the main one."""
    _, base = await _gateway(make_node)
    client = _openai(base)
    messages: list[Any] = _chat(MAIN, "fix the failing test")
    (title, _), (main, one) = await asyncio.gather(
        _opencode(client, _chat(TITLE, "fix the failing test"), max_tokens=LONG),
        _opencode(client, messages))
    messages += [one.choices[0].message.model_dump(exclude_none=True),
                 {"role": "user", "content": "now run it"}]
    again, two = await _opencode(client, messages)
    assert title != main and again == main
    assert two.usage.prompt_tokens_details.cached_tokens == (
        one.usage.prompt_tokens + one.usage.completion_tokens)


# -- Claude Code: Messages under x-claude-code-session-id ----------------------------------
async def test_claude_code_session_header_is_a_hint_for_side_and_concurrent_requests(
    make_node,
):
    """Through the anthropic SDK, under Claude Code's session id: a side request sent with
    the first turn is answered in its own session, and the main conversation's next turn
    continues the main session on its cache."""
    node, base = await _gateway(make_node)
    client = anthropic.AsyncAnthropic(base_url=base, api_key="unused", max_retries=0)
    head = {"x-claude-code-session-id": "0f4c6a52-7d0e-4d7c-9c1e-c1a0de000001"}

    async def ask(system: str, messages: list[Any], max_tokens: int = 6) -> Any:
        raw = await client.messages.with_raw_response.create(
            model="claude-test", system=system, messages=messages, max_tokens=max_tokens,
            extra_body={"temperature": 0}, extra_headers=head)
        return raw.headers["x-session-id"], await raw.parse()

    messages: list[Any] = [{"role": "user", "content": "fix the failing test"}]
    (title, _), (main, one) = await asyncio.gather(ask(TITLE, messages, LONG),
                                                   ask(MAIN, messages))
    messages += [{"role": "assistant", "content": one.content[0].text},
                 {"role": "user", "content": "now run it"}]
    again, two = await ask(MAIN, messages)
    assert title != main and again == main
    assert two.usage.cache_read_input_tokens == (
        one.usage.input_tokens + one.usage.cache_read_input_tokens + one.usage.output_tokens)
    assert await _users(node.url, main) == ["fix the failing test", "now run it"]


# -- Codex: Responses under prompt_cache_key -------------------------------------------------
async def test_prompt_cache_key_is_a_hint_for_side_and_concurrent_requests(make_node):
    """Through the openai SDK's Responses API, under one prompt_cache_key: a side request
    sent with the first turn is answered in its own session, and the main conversation's
    next turn continues the main session on its cache."""
    _, base = await _gateway(make_node)
    client = _openai(base)

    async def ask(instructions: str, items: list[Any], max_output_tokens: int = 6) -> Any:
        r = await client.responses.create(
            model="any", instructions=instructions, input=items, temperature=0,
            max_output_tokens=max_output_tokens, store=False,
            prompt_cache_key="019a-codex-conversation")
        return r.infernode["session"], r  # type: ignore[attr-defined]

    items: list[Any] = [{"role": "user", "content": "fix the failing test"}]
    (title, _), (main, one) = await asyncio.gather(ask(TITLE, items, LONG), ask(MAIN, items))
    items += [{"role": "assistant", "content": one.output_text},
              {"role": "user", "content": "now run it"}]
    again, two = await ask(MAIN, items)
    assert title != main and again == main
    assert two.usage.input_tokens_details.cached_tokens == (
        one.usage.input_tokens + one.usage.output_tokens)


# -- the index ------------------------------------------------------------------------------
async def test_a_hint_keeps_its_most_recently_committed_sessions_only(nc):
    """A hint files at most SESSIONS_PER_HINT sessions, the latest commit first; a session
    committing again moves to the front instead of being listed twice."""
    index = await ConversationIndex.open(nc.jetstream(), Subjects())
    for n in range(SESSIONS_PER_HINT + 2):
        await index.hinted("d" * 64, f"s{n}")
    await index.hinted("d" * 64, "s5")
    kept = await index.hint_sessions("d" * 64)
    newest = [f"s{n}" for n in range(SESSIONS_PER_HINT + 1, 1, -1)]
    assert kept == ("s5", *(s for s in newest if s != "s5"))
    assert len(kept) == SESSIONS_PER_HINT and await index.hint_sessions("e" * 64) == ()
