"""Choosing a chat template: built-in families (llama-3, gemma, phi-3), jinja files, the
fallback for a GGUF without a template, and the end-marker stop strings that end every turn.
(The built-ins' shared properties, such as re-rendering a reply exactly, are tested for every
built-in in tests/test_templates.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from actors.engine.templates.chat import TemplateError
from actors.engine.templates.choice import select_template, turn_stops
from schemas.chat import ChatMessage

BOS, EOS = "<bos>", "<eos>"
CHAT = [
    ChatMessage(role="system", content="Be brief."),
    ChatMessage(role="user", content="Hi"),
    ChatMessage(role="assistant", content="Hello."),
    ChatMessage(role="user", content="Bye"),
]


def test_llama_3_writes_headers_and_eot_after_bos():
    """llama-3: BOS, a header per turn, <|eot_id|> after each, the assistant header last."""
    text = select_template("llama-3", None, "<|begin_of_text|>", EOS).render(CHAT)
    assert text == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_gemma_opens_the_first_user_turn_with_the_system_text_and_calls_the_reply_model():
    """gemma has no system role: the system text opens the first user turn; replies are
    'model' turns."""
    text = select_template("gemma", None, BOS, EOS).render(CHAT)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_phi_3_writes_role_tags_and_end():
    """phi-3: <|role|> tags and <|end|>, tool results as user turns."""
    chat = [*CHAT[1:], ChatMessage(role="tool", content="42", tool_call_id="c1")]
    text = select_template("phi-3", None, BOS, EOS).render(chat)
    assert text == (
        "<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nBye<|end|>\n"
        "<|user|>\n<tool_response>42</tool_response><|end|>\n<|assistant|>\n"
    )


@pytest.mark.parametrize(("vocabulary", "family"), [
    ({"<start_of_turn>": 105, "<end_of_turn>": 106}, "gemma"),
    ({"<|start_header_id|>": 7, "<|eot_id|>": 9}, "llama-3"),
    ({"<|user|>": 1, "<|assistant|>": 2, "<|end|>": 3}, "phi-3"),
    ({"<|im_start|>": 1, "<|im_end|>": 2}, "chatml"),
    ({}, "chatml"),
])
def test_a_gguf_without_a_template_gets_its_vocabularys_family_with_a_warning(vocabulary, family):
    """No tokenizer.chat_template: the built-in whose markup the vocabulary holds (else
    chatml) is used, and a WARNING names it, its end marker and why."""
    with capture_logs() as logs:
        template = select_template("auto", None, BOS, EOS, vocabulary)
    assert template.name == family
    warning = next(e for e in logs if e["event"] == "chat_template_fallback")
    assert warning["log_level"] == "warning" and warning["template"] == family
    assert warning["end_marker"] == template.end_marker and "no tokenizer.chat_template" in (
        warning["reason"])


def test_a_template_file_is_used_probed_and_named_by_its_content(tmp_path: Path):
    """--chat-template FILE.jinja renders that file; its name changes with its content, so
    an edited file never restores snapshots made with the old one."""
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    template = select_template(str(path), "{{ 'gguf' }}", BOS, EOS)
    assert template.render(CHAT[1:2]) == "[user] Hi\n"
    path.write_text("{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}")
    edited = select_template(str(path), None, BOS, EOS)
    assert edited.name != template.name and edited.name.startswith("file:mine.jinja:")


def test_a_template_file_is_sandboxed_like_a_gguf_template(tmp_path: Path):
    """A file that reaches for Python internals is refused at start, naming the file."""
    path = tmp_path / "evil.jinja"
    path.write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError, match="evil.jinja"):
        select_template(str(path), None, BOS, EOS)


def test_an_unknown_name_that_is_no_file_lists_the_built_ins():
    """A name that is neither built in nor a file lists the choices."""
    with pytest.raises(TemplateError, match="llama-3.*gemma.*phi-3"):
        select_template("alpaca", None, BOS, EOS)


def test_the_end_marker_is_a_stop_unless_the_model_ends_at_that_token():
    """The marker is a stop string when it is no token, or a token the engine does not end
    at; never when the model writes it as an end-of-generation token."""
    gemma = select_template("gemma", None, BOS, EOS)
    assert turn_stops(gemma, {}, {2}) == ("<end_of_turn>",)
    assert turn_stops(gemma, {"<end_of_turn>": 106}, {2}) == ("<end_of_turn>",)
    assert turn_stops(gemma, {"<end_of_turn>": 106}, {2, 106}) == ()
    llama2 = select_template("llama-2", None, "<s>", "</s>")
    assert llama2.end_marker == "</s>"
    assert turn_stops(llama2, {"</s>": 2}, {2}) == ()
    assert select_template("auto", "{{ messages[0].content }}", BOS, EOS).end_marker is None
