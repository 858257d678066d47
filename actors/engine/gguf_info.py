"""What a GGUF file says about its model, read from the header before any engine loads it.

The bundled llama.cpp (ctransformers 0.2.27, September 2023) knows only some architectures;
a file of another one must be refused with a sentence saying what to do, not handed to C
code that fails obscurely. The ``gguf`` package reads the header through a memory map, so
the weights are never read here — except once by ``model_id_of``, which hashes them all.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import gguf

RUNNABLE_ARCHS = frozenset({"llama", "falcon"})
"""Architectures the bundled llama.cpp runs."""
READABLE_VERSIONS = frozenset({1, 2, 3})
"""GGUF versions it reads (3 only added big-endian files; little-endian ones read as 2)."""
READABLE_TOKENIZERS = frozenset({"llama", "gpt2"})
"""``tokenizer.ggml.model`` values it knows (SentencePiece and byte-level BPE)."""
_MAGIC = b"GGUF"


_HASH_CHUNK = 8 << 20
"""Bytes read per step while hashing a model file."""
_ids: dict[tuple[str, int, int], str] = {}
_ids_lock = threading.Lock()


def model_id_of(path: Path) -> str:
    """The identity of a model file: its size and the sha256 of every byte of it.

    A KV state belongs to the weights that computed it, so the identity covers the tensor
    data, not just the header (a file with changed weights but the same size and header
    must never restore the old model's states). Hashing reads the whole file once (about
    0.1 s for a 100 MB model, seconds for a multi-GB one); the result is kept per process by
    resolved path, size and modification time.
    """
    resolved = path.resolve()
    st = resolved.stat()
    key = (str(resolved), st.st_size, st.st_mtime_ns)
    with _ids_lock:
        known = _ids.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with resolved.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    model_id = f"{st.st_size:x}-{digest.hexdigest()[:32]}"
    with _ids_lock:
        _ids[key] = model_id
    return model_id


class ModelFileError(ValueError):
    """The model file is missing, not a GGUF file, or damaged."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class UnsupportedModelError(ValueError):
    """The GGUF is one the bundled llama.cpp cannot read or run; ``reason`` says why."""

    def __init__(self, path: Path, architecture: str, reason: str | None = None) -> None:
        self.reason = reason or f"{architecture} models need a newer llama.cpp"
        super().__init__(
            f"{path}: {self.reason}, which ctransformers 0.2.27 (llama.cpp of 2023-09) lacks; "
            "use --engine llama-cpp (pip install 'infernode[llamacpp]') or a GGUF it reads "
            f"(architectures {', '.join(sorted(RUNNABLE_ARCHS))}, GGUF v1-v3, a vocabulary "
            "with token scores and no tokenizer.ggml.pre)"
        )
        self.path = path
        self.architecture = architecture


@dataclass(frozen=True)
class GgufInfo:
    """Header facts of one GGUF file."""

    path: Path
    """The file."""
    version: int
    """GGUF format version."""
    architecture: str
    """``general.architecture``, e.g. ``llama``."""
    name: str | None
    """``general.name``."""
    file_type: int | None
    """``general.file_type`` (quantisation), as llama.cpp numbers it."""
    file_type_name: str | None
    """The file type's name, e.g. ``MOSTLY_Q4_K_M``."""
    context_length: int | None
    """Trained context length."""
    n_embd: int | None
    """Embedding width."""
    n_layer: int
    """Transformer blocks (0 when the header lacks them)."""
    n_head: int | None
    """Attention heads."""
    n_vocab: int
    """Tokens in the vocabulary."""
    tokenizer_model: str | None
    """``tokenizer.ggml.model``, e.g. ``llama`` (SentencePiece) or ``gpt2`` (BPE)."""
    bos_id: int | None
    """Beginning-of-sequence token id."""
    eos_id: int | None
    """End-of-sequence token id."""
    bos_token: str | None
    """Text of the BOS token."""
    eos_token: str | None
    """Text of the EOS token."""
    chat_template: str | None
    """``tokenizer.chat_template``, untrusted jinja source."""
    has_scores: bool = False
    """Whether ``tokenizer.ggml.scores`` is present (the 2023 loader requires it)."""
    tokenizer_pre: str | None = None
    """``tokenizer.ggml.pre``: the pre-tokenizer of current BPE vocabularies."""
    n_head_kv: int | None = None
    """Heads of the KV cache (fewer than ``n_head`` under grouped-query attention)."""
    key_length: int | None = None
    """Width of one head's key; None: ``n_embd / n_head``."""
    value_length: int | None = None
    """Width of one head's value; None: ``n_embd / n_head``."""


def read_gguf_info(path: Path) -> GgufInfo:
    """Read the header of the GGUF at ``path``; ``ModelFileError`` if it is not a sound one."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(path, f"cannot be read ({e.strerror or e})") from e
    if not magic:
        raise ModelFileError(path, "is empty; download the model again")
    if magic != _MAGIC:
        raise ModelFileError(
            path, f"is not a GGUF file (it starts with {magic!r}, not {_MAGIC!r}); convert "
            "the model to GGUF or download a .gguf build of it"
        )
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, … on damaged headers
        raise ModelFileError(path, f"is damaged or truncated ({e}); download it again") from e
    _check_complete(path, reader)
    arch = _string(reader, gguf.Keys.General.ARCHITECTURE)
    if not arch:
        raise ModelFileError(path, "has no general.architecture; it is not a model GGUF")
    return _info(path, reader, arch)


def _info(path: Path, reader: gguf.GGUFReader, arch: str) -> GgufInfo:
    keys = gguf.Keys
    bos_id = _int(reader, keys.Tokenizer.BOS_ID)
    eos_id = _int(reader, keys.Tokenizer.EOS_ID)
    file_type = _int(reader, keys.General.FILE_TYPE)
    tokens = reader.fields.get(keys.Tokenizer.LIST)
    return GgufInfo(
        path=path,
        version=int(_int(reader, "GGUF.version") or 0),
        architecture=arch,
        name=_string(reader, keys.General.NAME),
        file_type=file_type,
        file_type_name=_file_type_name(file_type),
        context_length=_int(reader, keys.LLM.CONTEXT_LENGTH.format(arch=arch)),
        n_embd=_int(reader, keys.LLM.EMBEDDING_LENGTH.format(arch=arch)),
        n_layer=_int(reader, keys.LLM.BLOCK_COUNT.format(arch=arch)) or 0,
        n_head=_int(reader, keys.Attention.HEAD_COUNT.format(arch=arch)),
        n_vocab=len(tokens.data) if tokens is not None else 0,
        tokenizer_model=_string(reader, keys.Tokenizer.MODEL),
        bos_id=bos_id,
        eos_id=eos_id,
        bos_token=_token_text(tokens, bos_id),
        eos_token=_token_text(tokens, eos_id),
        chat_template=_string(reader, keys.Tokenizer.CHAT_TEMPLATE),
        has_scores=keys.Tokenizer.SCORES in reader.fields,
        tokenizer_pre=_string(reader, keys.Tokenizer.PRE),
        n_head_kv=_int(reader, keys.Attention.HEAD_COUNT_KV.format(arch=arch)),
        key_length=_int(reader, keys.Attention.KEY_LENGTH.format(arch=arch)),
        value_length=_int(reader, keys.Attention.VALUE_LENGTH.format(arch=arch)),
    )


def ctransformers_refusal(info: GgufInfo) -> str | None:
    """Why the bundled llama.cpp cannot load ``info``'s file, or None when it can.

    Its loader (September 2023) throws on an unknown architecture or tokenizer model and on
    a vocabulary without scores; a ``tokenizer.ggml.pre`` names a pre-tokenizer it predates,
    so it would load the file but split text differently from the model's training.
    """
    if info.architecture not in RUNNABLE_ARCHS:
        return f"{info.architecture} models need a newer llama.cpp"
    if info.version not in READABLE_VERSIONS:
        return f"GGUF version {info.version} needs a newer llama.cpp"
    model = info.tokenizer_model or "llama"
    if model not in READABLE_TOKENIZERS:
        return f"its {model!r} tokenizer needs a newer llama.cpp"
    if not info.has_scores:
        return "its vocabulary has no tokenizer.ggml.scores (a current BPE vocabulary)"
    if info.tokenizer_pre:
        return (f"its vocabulary's pre-tokenizer {info.tokenizer_pre!r} "
                "(tokenizer.ggml.pre) needs a newer llama.cpp")
    return None


def check_runnable(info: GgufInfo) -> None:
    """Refuse, with a sentence, a model the bundled llama.cpp cannot read or run."""
    reason = ctransformers_refusal(info)
    if reason is not None:
        raise UnsupportedModelError(info.path, info.architecture, reason)


def _check_complete(path: Path, reader: gguf.GGUFReader) -> None:
    # The reader maps tensors lazily; a cut download only shows as data past the file's end.
    size = path.stat().st_size
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelFileError(
            path, f"is truncated: its tensors end at byte {end} but the file has {size} bytes; "
            "download it again"
        )


def _field_value(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.fields.get(key)
    if field is None or not field.types:
        return None
    try:
        return field.contents()
    except (UnicodeDecodeError, IndexError, ValueError):
        return None


def _string(reader: gguf.GGUFReader, key: str) -> str | None:
    value = _field_value(reader, key)
    return value if isinstance(value, str) else None


def _int(reader: gguf.GGUFReader, key: str) -> int | None:
    value = _field_value(reader, key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _token_text(tokens: gguf.ReaderField | None, token_id: int | None) -> str | None:
    if tokens is None or token_id is None or not 0 <= token_id < len(tokens.data):
        return None
    return bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8", errors="replace")


def _file_type_name(file_type: int | None) -> str | None:
    if file_type is None:
        return None
    try:
        return gguf.LlamaFileType(file_type).name
    except ValueError:
        return None
