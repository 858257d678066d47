"""``--ctx`` left at 0: each slot gets the model's trained context, as far as memory allows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from structlog.testing import capture_logs

from actors.engine.context_size import choose_context, kv_bytes_per_token
from actors.engine.gguf_info import read_gguf_info
from actors.engine.loader import load_engine
from node.config import NodeConfig
from node.demo_model import TINY

GIB = 1 << 30


def test_auto_context_is_the_trained_context_when_memory_holds_it(tiny_model: Path):
    """With plenty of memory the tiny model's slots get its trained 4096 tokens, and the
    reason names the KV cache they take."""
    info = read_gguf_info(tiny_model)
    choice = choose_context(0, info, 2, 64 * GIB)
    assert choice.n_ctx == TINY.n_ctx == 4096
    assert choice.reason.startswith("trained context; KV ") and "for 2 slots" in choice.reason


def test_kv_bytes_count_layers_kv_heads_and_head_widths(tiny_model: Path):
    """A token's KV takes layers x KV heads x (key + value width) x 2 bytes; grouped-query
    heads and explicit key widths (gemma-3 270M: 18 layers, 1 KV head of 256) count."""
    info = read_gguf_info(tiny_model)
    assert kv_bytes_per_token(info) == TINY.n_layer * TINY.n_embd * 2 * 2
    gemma = replace(info, architecture="gemma3", n_layer=18, n_embd=640, n_head=4,
                    n_head_kv=1, key_length=256, value_length=256, context_length=32768)
    assert kv_bytes_per_token(gemma) == 18 * 512 * 2
    choice = choose_context(0, gemma, 2, 64 * GIB)
    assert choice.n_ctx == 32768 and "KV 1.1 GiB for 2 slots" in choice.reason


def test_auto_context_is_bounded_by_half_the_available_memory(tiny_model: Path):
    """When the trained context's KV cache for every slot exceeds half the available memory,
    the context is what that half holds, rounded down to a power of two (the same at every
    start, so banked snapshots still fit), and the reason says so."""
    info = read_gguf_info(tiny_model)
    per_token = kv_bytes_per_token(info)
    available = 2 * (2 * 1000 * per_token)  # half of it holds 1000 tokens in each of 2 slots
    choice = choose_context(0, info, 2, available)
    assert choice.n_ctx == 512
    assert choose_context(0, info, 2, available * 9 // 10).n_ctx == 512  # stable
    assert choice.reason.startswith("bounded by RAM: 4096 tokens (trained context)")


def test_an_explicit_ctx_wins_over_the_trained_context(tiny_model: Path):
    """``--ctx 512`` is taken as given, whatever the header and memory say."""
    info = read_gguf_info(tiny_model)
    assert choose_context(512, info, 2, 1).n_ctx == 512


def test_a_header_without_a_trained_context_falls_back_to_2048(tiny_model: Path):
    """A GGUF that names no context length gets 2048 tokens, and the reason says why."""
    info = replace(read_gguf_info(tiny_model), context_length=None)
    choice = choose_context(0, info, 1, 64 * GIB)
    assert choice.n_ctx == 2048 and "no trained context" in choice.reason


async def test_a_node_config_defaults_to_auto_and_the_load_logs_the_choice(tiny_model: Path):
    """NodeConfig's ``n_ctx`` defaults to 0; the engine loads with the trained context and
    logs ``context_chosen`` with its reason."""
    config = NodeConfig(model=tiny_model, engine="ctransformers", threads=1,
                        verify_restore=False, bank_ram_bytes=0)
    assert config.n_ctx == 0
    with capture_logs() as logs:
        engine = load_engine(config)
    try:
        assert engine.info.n_ctx == 4096
        [chosen] = [e for e in logs if e["event"] == "context_chosen"]
        assert chosen["n_ctx"] == 4096 and "trained context" in chosen["reason"]
    finally:
        await engine.close()
