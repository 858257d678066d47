"""Write small llama-architecture GGUF files with random weights.

The demo and the tests need a model that the bundled llama.cpp loads and runs, and that
nobody has to download. Its weights are random, seeded, so its text is noise: it exercises
the wiring (tokenizer, KV cache, sampling, snapshots), never the quality of an answer.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEMO_SEED = 1234

# Tokens of the SentencePiece-style vocab, after <unk>, <s>, </s> and the 256 byte tokens.
_WORDS = (
    "the of and to in is that it for on with as was at by be this are from or have an they "
    "which one you had not but what all were when we there can your said each she do how "
    "their if will up other about out many then them these so some her would make like him "
    "into time has look two more write go see number no way could people my than first water "
    "been call who oil its now find long down day did get come made may part hello world node "
    "agent session prompt token cache bank turn reply tool user assistant system"
).split()
_CHAT_PIECES = ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "[INST]", "[/INST]")
_FIRST_TEXT_TOKEN = 3 + 256 + len(_CHAT_PIECES)
"""Control, byte and chat-markup tokens come first; the demo model never samples them."""
_BIAS_FEATURE = 4.0


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a generated llama model."""

    n_embd: int = 64
    """Width of the residual stream."""
    n_layer: int = 2
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads (the KV heads equal these)."""
    n_ff: int = 128
    """Width of the feed-forward layer."""
    n_ctx: int = 4096
    """Trained context length written into the header."""
    f16: bool = False
    """Store the matrices as float16 instead of float32."""


TINY = ModelShape()
BENCH = ModelShape(n_embd=1024, n_layer=8, n_head=16, n_ff=2816, n_ctx=4096, f16=True)


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    tokens += list(_CHAT_PIECES)
    types += [4] * len(_CHAT_PIECES)  # user-defined: the tokenizer keeps them whole
    pieces: list[str] = []
    for ch in string.ascii_letters + string.digits + string.punctuation:
        pieces += [ch, "\u2581" + ch]
    pieces.append("\u2581")
    pieces += ["\u2581" + w for w in _WORDS] + list(_WORDS)
    seen = set(tokens)
    unique = [p for p in pieces if not (p in seen or seen.add(p))]
    tokens += unique
    types += [1] * len(unique)
    # SentencePiece merges prefer higher scores: longer pieces win over their parts.
    scores = [0.0] * _FIRST_TEXT_TOKEN + [float(len(p)) for p in unique]
    return tokens, scores, types


def write_llama_gguf(
    path: Path,
    shape: ModelShape = TINY,
    seed: int = DEMO_SEED,
    chat_template: str | None = None,
    name: str = "infernode-demo (random weights, wiring only)",
) -> Path:
    """Write a llama-architecture GGUF with seeded random weights to ``path``."""
    import gguf  # imported here: only the writer needs it

    tokens, scores, types = _vocab()
    rng = np.random.default_rng(seed)
    dtype = np.float16 if shape.f16 else np.float32
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(dtype)

    n_vocab, d = len(tokens), shape.n_embd
    # Column 0 of every embedding is a large constant that survives the random layers, so the
    # output rows can use it as a bias: control and byte tokens get a strongly negative logit.
    # The demo then speaks in words and streams to max_tokens instead of stopping at random.
    embd = mat(n_vocab, d)
    embd[:, 0] = _BIAS_FEATURE
    writer.add_tensor("token_embd.weight", embd)
    for i in range(shape.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, dtype=np.float32))
        for proj in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{proj}.weight", mat(d, d))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", mat(shape.n_ff, d))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", mat(shape.n_ff, d))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", mat(d, shape.n_ff))
    writer.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    output = mat(n_vocab, d)
    output[:, 0] = 0.0
    output[:_FIRST_TEXT_TOKEN, 0] = -5 * _BIAS_FEATURE
    writer.add_tensor("output.weight", output)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path
