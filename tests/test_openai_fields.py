"""OpenAI chat-completion fields on a prompt: read into infernode's own, or refused by name."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas.chat import ChatMessage, SamplingParams
from schemas.messages import PromptRequest


def parse(**body: object) -> PromptRequest:
    return PromptRequest.model_validate_json(json.dumps(body))


def refusal(**body: object) -> str:
    with pytest.raises(ValidationError) as e:
        parse(**body)
    return str(e.value)


HI = [{"role": "user", "content": "hi"}]


def test_top_level_sampling_fields_are_read_into_sampling():
    """temperature, top_p, seed and both penalties at the top level set ``sampling``."""
    p = parse(messages=HI, temperature=0, top_p=0.5, seed=9, frequency_penalty=0.3,
              presence_penalty=-0.4, sampling={"top_k": 7})
    assert p.sampling == SamplingParams(temperature=0, top_p=0.5, seed=9, top_k=7,
                                        frequency_penalty=0.3, presence_penalty=-0.4)


def test_a_setting_given_twice_with_two_values_is_refused_and_with_one_value_accepted():
    """temperature vs sampling.temperature and max_tokens vs max_completion_tokens."""
    assert "temperature" in refusal(messages=HI, temperature=0.1, sampling={"temperature": 1})
    assert "max_completion_tokens" in refusal(messages=HI, max_tokens=3, max_completion_tokens=4)
    same = parse(messages=HI, temperature=0.1, sampling={"temperature": 0.1},
                 max_tokens=3, max_completion_tokens=3)
    assert same.sampling.temperature == 0.1 and same.max_tokens == 3


def test_max_completion_tokens_is_max_tokens_with_its_bounds():
    """max_completion_tokens sets max_tokens, and its range is max_tokens' range."""
    assert parse(messages=HI, max_completion_tokens=12).max_tokens == 12
    assert "max_tokens" in refusal(messages=HI, max_completion_tokens=0)


def test_stop_may_be_one_string_or_a_list():
    """A string is one stop string; a list stays a list."""
    assert parse(messages=HI, stop="END").stop == ("END",)
    assert parse(messages=HI, stop=["a", "b"]).stop == ("a", "b")
    assert "stop" in refusal(messages=HI, stop="x" * 65)


def test_model_stream_user_and_parallel_tool_calls_are_accepted_and_n_must_be_1():
    """The fields that carry no setting here are accepted; n other than 1 is refused."""
    p = parse(messages=HI, model="anything", stream=False, user="u-1", parallel_tool_calls=True,
              n=1)
    assert (p.model, p.stream, p.user, p.parallel_tool_calls, p.n) == (
        "anything", False, "u-1", True, 1)
    assert "n\n" in refusal(messages=HI, n=2)


@pytest.mark.parametrize("field", ["logit_bias", "logprobs", "functions", "temprature"])
def test_any_other_field_is_refused_by_name(field):
    """Typos and fields infernode cannot honour are refused, naming the field."""
    assert field in refusal(messages=HI, **{field: 1})


def test_developer_is_system_and_text_parts_are_joined_by_newlines():
    """Role developer reads as system; a list of text parts reads as their joined text."""
    m = ChatMessage.model_validate({"role": "developer", "content": [
        {"type": "text", "text": "one"}, {"type": "text", "text": "two"}]})
    assert (m.role, m.content) == ("system", "one\ntwo")


@pytest.mark.parametrize(("parts", "named"), [
    ([{"type": "image_url", "image_url": {"url": "x"}}], "image_url"),
    ([{"type": "text", "text": "a", "cache_control": {}}], "cache_control"),
    ([{"type": "text"}], "text"),
    (["plain"], "str"),
    ([], "empty"),
])
def test_content_parts_other_than_text_are_refused_naming_them(parts, named):
    """Images, unknown part fields, missing text, bare strings and no parts are refused."""
    with pytest.raises(ValidationError) as e:
        ChatMessage.model_validate({"role": "user", "content": parts})
    assert named in str(e.value)
