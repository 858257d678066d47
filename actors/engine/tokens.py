"""Facts about token sequences that the engine, its turns and its bank all use.

A token prefix is identified by its sha256 here and only here; whoever has the digest
passes it along rather than hashing the same tokens again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence


def token_hash(tokens: Sequence[int]) -> str:
    """sha256 of token ids (as little-endian int32)."""
    return hashlib.sha256(array("i", tokens).tobytes()).hexdigest()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: histories run to thousands of tokens.
    step = 256
    while i + step <= n and a[i : i + step] == b[i : i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


BLOCK = 16
"""Tokens per block of a prefix hash chain."""


def block_chain(tokens: Sequence[int], block: int = BLOCK, salt: bytes = b"") -> list[bytes]:
    """Hash chain over the whole blocks of ``tokens``: entry i identifies tokens[: (i+1)*block].

    Each link hashes the previous link and the block, so equal links mean equal prefixes
    (as in vLLM's automatic prefix caching); partial trailing blocks are not hashed. A
    ``salt`` (a trust domain) starts the chain, so chains of other salts never meet it.
    """
    out: list[bytes] = []
    link = hashlib.sha256(salt).digest() if salt else b""
    for end in range(block, len(tokens) + 1, block):
        link = hashlib.sha256(link + array("i", tokens[end - block : end]).tobytes()).digest()
        out.append(link)
    return out
