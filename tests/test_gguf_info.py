"""Reading GGUF headers, and refusing what the bundled llama.cpp cannot run."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest

from actors.engine.gguf_info import (
    RUNNABLE_ARCHS,
    ModelFileError,
    UnsupportedModelError,
    check_runnable,
    read_gguf_info,
)
from node.demo_model import TINY, write_llama_gguf
from tests.support.gguf_files import write_header_only

TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "demo.gguf")


def test_demo_model_header_is_read(demo_gguf: Path):
    """The demo GGUF's architecture, sizes, vocab and special tokens come back."""
    info = read_gguf_info(demo_gguf)
    assert info.architecture == "llama"
    assert info.name == "infernode-demo (random weights, wiring only)"
    assert (info.context_length, info.n_embd, info.n_layer, info.n_head) == (
        TINY.n_ctx, TINY.n_embd, TINY.n_layer, TINY.n_head
    )
    assert info.n_vocab > 259
    assert (info.bos_id, info.eos_id, info.bos_token, info.eos_token) == (1, 2, "<s>", "</s>")
    assert info.tokenizer_model == "llama"
    assert info.chat_template is None
    assert info.version >= 2


def test_chat_template_is_read_from_the_header(tmp_path: Path):
    """tokenizer.chat_template is returned verbatim."""
    path = write_llama_gguf(tmp_path / "chat.gguf", chat_template=TEMPLATE)
    assert read_gguf_info(path).chat_template == TEMPLATE


def test_file_type_is_named(tmp_path: Path):
    """general.file_type is reported with llama.cpp's name for it."""
    path = tmp_path / "ft.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = read_gguf_info(path)
    assert (info.file_type, info.file_type_name) == (15, "MOSTLY_Q4_K_M")


@pytest.mark.parametrize("arch", sorted(RUNNABLE_ARCHS))
def test_runnable_architectures_pass_the_check(tmp_path: Path, arch: str):
    """llama and falcon GGUFs are accepted."""
    check_runnable(read_gguf_info(write_header_only(tmp_path / f"{arch}.gguf", arch)))


def test_qwen2_is_refused_with_a_message_naming_it_and_the_way_out(tmp_path: Path):
    """A qwen2 GGUF is refused at the header, naming the architecture and the other engine."""
    info = read_gguf_info(write_header_only(tmp_path / "qwen2.gguf", "qwen2"))
    assert (info.architecture, info.context_length, info.eos_token) == (
        "qwen2", 32768, "<|im_end|>"
    )
    with pytest.raises(UnsupportedModelError) as refused:
        check_runnable(info)
    assert refused.value.architecture == "qwen2"
    message = str(refused.value)
    assert "qwen2 models need a newer llama.cpp" in message
    assert "--engine llama-cpp" in message


def test_garbage_is_not_a_gguf_file(tmp_path: Path):
    """A file without the GGUF magic is refused with a sentence saying so."""
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"this is not a model\n" * 20)
    with pytest.raises(ModelFileError, match="is not a GGUF file"):
        read_gguf_info(path)


@pytest.mark.parametrize("keep", [0, 4, 40, 400, "half"])
def test_a_truncated_gguf_is_refused(demo_gguf: Path, tmp_path: Path, keep):
    """A cut-off download, whether in the header or the tensors, is a ModelFileError."""
    data = demo_gguf.read_bytes()
    size = len(data) // 2 if keep == "half" else keep
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:size])
    with pytest.raises(ModelFileError) as refused:
        read_gguf_info(path)
    assert refused.value.path == path


def test_a_missing_file_is_a_model_file_error(tmp_path: Path):
    """A path that does not exist is refused as unreadable."""
    with pytest.raises(ModelFileError, match="cannot be read"):
        read_gguf_info(tmp_path / "absent.gguf")


def test_a_gguf_without_an_architecture_is_refused(tmp_path: Path):
    """A GGUF that is not a model (no general.architecture) is refused."""
    path = tmp_path / "noarch.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))  # version 3, no tensors, no keys
    with pytest.raises(ModelFileError, match="general.architecture"):
        read_gguf_info(path)
