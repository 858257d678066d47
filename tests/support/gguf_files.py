"""GGUF files written for tests: a header with a few keys and a tiny vocabulary, no tensors."""

from __future__ import annotations

from pathlib import Path

import gguf


def write_header_only(path: Path, arch: str) -> Path:
    """A minimal GGUF: architecture, a few keys, a tiny vocab, no tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(32768)
    writer.add_block_count(2)
    writer.add_token_list(["<unk>", "<|endoftext|>", "<|im_end|>"])
    writer.add_token_scores([0.0, 0.0, 0.0])
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
