"""Chat templates: the guarded sandbox, the fallbacks, tool-call parsing, prefix stability."""

from __future__ import annotations

import functools
import itertools
import json
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.engine.templates import sandbox as template_sandbox
from actors.engine.templates.chat import (
    FALLBACK_SOURCES,
    TEMPLATE_CHOICES,
    ChatTemplate,
    TemplateError,
    format_tool_call,
    parse_tool_calls,
)
from actors.engine.templates.choice import select_template
from schemas.chat import ChatMessage, FunctionCall, ToolCall

BOS, EOS = "<s>", "</s>"


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def system(text: str) -> ChatMessage:
    return ChatMessage(role="system", content=text)


def assistant(text: str, *calls: ToolCall) -> ChatMessage:
    return ChatMessage(role="assistant", content=text, tool_calls=calls or None)


def call(name: str, arguments: str, id: str = "call_1") -> ToolCall:
    return ToolCall(id=id, function=FunctionCall(name=name, arguments=arguments))


def tool(text: str, call_id: str = "call_1") -> ChatMessage:
    return ChatMessage(role="tool", content=text, tool_call_id=call_id)


def id_factory():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


@functools.cache
def fallback(name: str) -> ChatTemplate:
    return select_template(name, None, BOS, EOS)


def render_untrusted(source: str) -> str:
    return ChatTemplate(source, BOS, EOS, time_limit_s=0.3).render([user("hi")])


# -- the fallbacks --------------------------------------------------------------------------
def test_chatml_renders_each_message_as_an_im_block_and_opens_the_reply():
    """chatml writes <|im_start|>role\\ncontent<|im_end|> per message, then the reply header."""
    text = fallback("chatml").render([system("Be brief."), user("Hi"), assistant("Hello."),
                                      user("Bye")])
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_llama2_folds_the_system_prompt_into_the_first_instruction():
    """llama-2 puts <<SYS>> inside the first [INST] and starts every exchange with BOS."""
    text = fallback("llama-2").render([system("Be brief."), user("Hi"), assistant(" Hello."),
                                       user("Bye")])
    assert text == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]"
    )


def test_mistral_writes_bos_once_and_eos_after_each_reply():
    """mistral prefixes the system prompt to the first instruction; BOS once, EOS per reply."""
    text = fallback("mistral").render([system("Be brief."), user("Hi"), assistant(" Hello."),
                                       user("Bye")])
    assert text == "<s>[INST] Be brief.\n\nHi [/INST] Hello.</s>[INST] Bye [/INST]"


def test_chatml_renders_tool_calls_as_blocks_and_results_as_tool_turns():
    """An assistant's calls follow its content as <tool_call> blocks; results are tool turns."""
    text = fallback("chatml").render([
        user("Weather?"),
        assistant("Checking.", call("weather", '{"city": "Paris"}'), call("time", "{}", "c2")),
        tool('{"temp": 21}'),
    ])
    assert (
        '<|im_start|>assistant\nChecking.\n<tool_call>{"name": "weather", "arguments": '
        '{"city": "Paris"}}</tool_call>\n<tool_call>{"name": "time", "arguments": {}}'
        '</tool_call><|im_end|>\n<|im_start|>tool\n{"temp": 21}<|im_end|>\n'
    ) in text


@pytest.mark.parametrize("name", ["llama-2", "mistral"])
def test_inst_styles_wrap_tool_results_in_tool_response_inside_one_instruction(name):
    """Without a tool role, consecutive results share one [INST] as <tool_response> blocks."""
    text = fallback(name).render([
        user("Go"), assistant("", call("a", "{}"), call("b", "{}", "c2")),
        tool("1"), tool("2", "c2"),
    ])
    assert text.endswith("[INST] <tool_response>1</tool_response>\n"
                         "<tool_response>2</tool_response> [/INST]")


@pytest.mark.parametrize("name", list(FALLBACK_SOURCES))
def test_fallbacks_describe_the_tools_when_given(name):
    """Given tools, a fallback lists their schemas and how to call them, once."""
    schema = {"type": "function", "function": {"name": "weather", "parameters": {}}}
    text = fallback(name).render([user("Hi")], tools=[schema])
    assert text.count(json.dumps(schema)) == 1
    assert "<tool_call>" in text


# -- the invariant: a reply re-renders as prompt + raw ----------------------------------------
HISTORIES = [
    [user("Hi")],
    [system("Be brief."), user("Hi")],
    [user("Weather?"), assistant("", call("weather", '{"city": "Paris"}')), tool("21 C")],
    [system("S"), user("a"), assistant(" b"), user("c")],
]
RAWS = [
    " Hello there.",
    "Hello\n\n",
    "",
    "Let me look.\n" + format_tool_call("weather", '{"city": "Paris"}'),
    format_tool_call("a", "{}") + "\n" + format_tool_call("b", '{"x": [1, 2]}'),
    ' <tool_call>\n{"name":"weather","arguments":{"city":"Paris"}}\n</tool_call>\n',
    "<tool_call>{not json}</tool_call> trailing",
]


@pytest.mark.parametrize("name", list(FALLBACK_SOURCES))
@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("raw", RAWS)
def test_reply_stored_with_its_raw_text_rerenders_as_prompt_plus_raw(name, history, raw):
    """With raw_assistant, the next render starts with the prompt the model saw plus its text."""
    template = fallback(name)
    content, calls = parse_tool_calls(raw, id_factory())
    reply = ChatMessage(role="assistant", content=content, tool_calls=calls or None)
    prompt = template.render(history, add_generation_prompt=True)
    full = template.render([*history, reply], False, raw_assistant={len(history): raw})
    assert full.startswith(prompt + raw)


CANONICAL_RAWS = [
    "Hello there.",
    "Let me look.\n" + format_tool_call("weather", '{"city": "Paris"}'),
    format_tool_call("a", "{}") + "\n" + format_tool_call("b", '{"x": [1, 2]}'),
]


@pytest.mark.parametrize("name", list(FALLBACK_SOURCES))
@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("raw", CANONICAL_RAWS)
def test_canonical_reply_rerenders_exactly_from_its_parsed_form(name, history, raw):
    """A reply in canonical form re-renders as prompt + raw even without its raw text."""
    template = fallback(name)
    content, calls = parse_tool_calls(raw, id_factory())
    reply = ChatMessage(role="assistant", content=content, tool_calls=calls or None)
    prompt = template.render(history, add_generation_prompt=True)
    assert template.render([*history, reply], False).startswith(prompt + raw)


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(list(FALLBACK_SOURCES)), raw=_text, question=_text)
def test_any_raw_reply_rerenders_as_prompt_plus_raw(name, raw, question):
    """Property: for any generated text, prompt + raw is a prefix of the next render."""
    template = fallback(name)
    history = [user(question)]
    reply = ChatMessage(role="assistant", content="placeholder")
    prompt = template.render(history)
    full = template.render([*history, reply], False, raw_assistant={1: raw})
    assert full.startswith(prompt + raw)


@pytest.mark.parametrize("name", list(FALLBACK_SOURCES))
def test_fallbacks_pass_the_extends_prefix_probe(name):
    """Every built-in template keeps the prefix property its probe checks."""
    assert fallback(name).extends_prefix()


def test_a_template_that_trims_replies_fails_the_extends_prefix_probe():
    """A template that strips assistant content cannot promise prefix reuse."""
    source = ("{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>"
              "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    assert not ChatTemplate(source).extends_prefix()


def test_raw_text_for_a_user_message_is_refused():
    """Only assistant messages can be replaced by generated text."""
    with pytest.raises(TemplateError, match="only assistant"):
        fallback("chatml").render([user("hi")], raw_assistant={0: "x"})


# -- tool-call parsing ----------------------------------------------------------------------
def test_parse_extracts_calls_and_strips_the_blocks_from_the_text():
    """Blocks become ToolCalls with fresh ids; the text keeps only the prose, stripped."""
    raw = ('Let me check.\n<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}'
           '</tool_call>\n<tool_call> {"name": "time", "arguments": "{\\"tz\\": 1}"} </tool_call>')
    text, calls = parse_tool_calls(raw, id_factory())
    assert text == "Let me check."
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_0", "weather", '{"city": "Paris"}'), ("call_1", "time", '{"tz": 1}'),
    ]


@pytest.mark.parametrize("block", [
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>{"name": "", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
    '<tool_call>["f"]</tool_call>',
    '<tool_call>{"name": "f", "arguments": {}}',
])
def test_malformed_blocks_stay_in_the_text_and_make_no_call(block):
    """Bad JSON, a missing name, odd arguments or an unclosed block are left as text."""
    text, calls = parse_tool_calls("Hi " + block, id_factory())
    assert calls == ()
    assert text == "Hi " + block


def test_missing_arguments_mean_an_empty_object():
    """A block with only a name calls the function with {}."""
    _, calls = parse_tool_calls('<tool_call>{"name": "now"}</tool_call>', id_factory())
    assert calls[0].function.arguments == "{}"


_json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | _text
_json = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(
    content=_text.map(str.strip).filter(lambda s: "<tool_call>" not in s),
    calls=st.lists(
        st.tuples(st.text(min_size=1, max_size=12).filter(str.strip),
                  st.dictionaries(_text, _json, max_size=3)),
        max_size=3,
    ),
)
def test_canonical_tool_calls_round_trip_through_text(content, calls):
    """Property: format → parse gives back the content and calls, and renders back exactly."""
    blocks = [format_tool_call(name, json.dumps(args)) for name, args in calls]
    raw = "\n".join(([content] if content else []) + blocks)
    text, parsed = parse_tool_calls(raw, id_factory())
    assert text == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in parsed] == calls
    assert [format_tool_call(c.function.name, c.function.arguments) for c in parsed] == blocks
    reply = ChatMessage(role="assistant", content=text, tool_calls=parsed or None)
    assert fallback("chatml").render([reply], False) == (
        "<|im_start|>assistant\n" + raw + "<|im_end|>\n"
    )


# -- the sandbox ----------------------------------------------------------------------------
@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''|attr('__class__') }}",
    "{{ '{0.__class__}'.format('') }}",
    "{{ messages.append(1) }}",
    "{{ namespace.__init__.__globals__['os'] }}",
    "{% include '/etc/passwd' %}",
])
def test_sandbox_escape_attempts_raise_template_error(source):
    """Dunder access, mutation and file access are refused with TemplateError."""
    with pytest.raises(TemplateError):
        render_untrusted(source)


@pytest.mark.parametrize("source", [
    "{% for x in range(10**12) %}{% endfor %}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{% set l = range(100000)|list %}{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
])
def test_runaway_loops_and_recursion_are_stopped_quickly(source):
    """Infinite loops and recursion end in TemplateError within about the time limit."""
    start = time.monotonic()
    with pytest.raises(TemplateError):
        render_untrusted(source)
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "{% for i in range(100000) %}" + "L" * 1000 + "{% endfor %}",
    "{{ 'x' * 10**10 }}",
    "{{ ['x'] * 10**9 }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}{{ ns.s }}",
    "{% set b = 'x' * 1000000 %}{% set y %}{% for i in range(100000) %}{{ b }}{% endfor %}"
    "{% endset %}{{ y|length }}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{% set b = 'x' * 1000000 %}{{ b.join(['a'] * 1000) }}",
    "{% set b = 'x' * 1000000 %}{{ b|replace('', b) }}",
    "{% set b = 'x' * 1000000 %}{{ ([b] * 100)|string }}",
    "{% set ns = namespace(b='x' * 1000000) %}{{ ([ns] * 1000)|map(attribute='b')|join }}",
    "{% set ns = namespace(b='x' * 1000000) %}{{ ''.join(([ns] * 1000)|map(attribute='b')) }}",
    "{{ 2 ** 100000 }}",
    "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
    "{% endfor %}{{ ns.x }}",
])
def test_output_and_memory_bombs_are_refused(source):
    """Huge output, values and arithmetic are refused before they exhaust memory or time."""
    start = time.monotonic()
    with pytest.raises(TemplateError):
        render_untrusted(source)
    assert time.monotonic() - start < 3.0


def test_a_runaway_render_on_one_thread_does_not_stop_renders_on_others(monkeypatch):
    """Budgets are per render: while one render loops on, another on this thread succeeds."""
    looping = threading.Event()

    def signal(fmt: str) -> str:
        looping.set()
        return fmt

    monkeypatch.setattr(template_sandbox, "_strftime_now", signal)
    runaway = ChatTemplate("{{ strftime_now('') }}{% for a in range(100000) %}"
                           "{% for b in range(100000) %}{% endfor %}{% endfor %}",
                           time_limit_s=1.0)
    errors: list[Exception] = []

    def run() -> None:
        try:
            runaway.render([user("hi")])
        except TemplateError as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    assert looping.wait(timeout=10), "the runaway render did not start"
    assert fallback("chatml").render([user("hi")]).startswith("<|im_start|>user")
    assert thread.is_alive()
    thread.join(timeout=10)
    assert len(errors) == 1


def test_raise_exception_reports_the_template_message():
    """raise_exception() from a template becomes a TemplateError carrying its message."""
    with pytest.raises(TemplateError, match="roles must alternate"):
        render_untrusted("{{ raise_exception('roles must alternate') }}")


def test_a_syntax_error_is_reported_with_its_line():
    """A template that does not parse is refused at construction, naming the line."""
    with pytest.raises(TemplateError, match=r"does not parse.*line 2"):
        ChatTemplate("ok\n{% for %}")


def test_hf_style_template_sees_messages_tools_and_helpers():
    """Templates get OpenAI-shaped dicts (arguments as a dict), tools, tokens and helpers."""
    source = (
        "{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.id }} {{ c.function.name }}"
        " city={{ c.function.arguments.city }}]{% endfor %}"
        "{% if m.tool_call_id is defined %}({{ m.tool_call_id }}){% endif %};{% endfor %}"
        "{{ tools[0].name }}|{{ tools | tojson }}|{{ strftime_now('%Y')|length }}"
        "{% generation %}|{{ add_generation_prompt }}{% endgeneration %}{{ eos_token }}"
    )
    text = ChatTemplate(source, BOS, EOS).render(
        [user("é"), assistant("", call("weather", '{"city": "Paris"}')), tool("21")],
        tools=[{"name": "weather"}],
    )
    assert text == (
        '<s>user:é;assistant:[call_1 weather city=Paris];tool:21(call_1);weather|'
        '[{"name": "weather"}]|4|True</s>'
    )


def test_tojson_renders_a_tool_whose_schema_nests_many_levels_deep():
    """A tool's JSON Schema nested 40 objects deep (Codex's request_user_input is 10) goes
    through tojson whole instead of being measured as past the output limit."""
    schema: dict = {"type": "string"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"x": schema}}
    tools = [{"type": "function", "function": {"name": "deep", "parameters": schema}}]
    text = ChatTemplate("{{ tools | tojson }}").render([user("hi")], tools=tools)
    assert json.loads(text) == tools


def test_tojson_of_a_value_nested_past_the_depth_limit_is_refused_with_a_sentence():
    """A template that nests a list in itself in a loop is stopped by the depth bound
    before tojson recurses into it."""
    source = ("{% set ns = namespace(x=[]) %}{% for i in range(2000) %}{% set ns.x = [ns.x] %}"
              "{% endfor %}{{ ns.x | tojson }}")
    with pytest.raises(TemplateError, match="nested more than 256 levels deep"):
        ChatTemplate(source).render([user("hi")])


# -- selection ------------------------------------------------------------------------------
def test_auto_uses_the_gguf_template_when_it_renders():
    """auto prefers the model's own template."""
    template = select_template("auto", "{% for m in messages %}{{ m.content }}{% endfor %}",
                               BOS, EOS)
    assert template.name == "gguf"


@pytest.mark.parametrize("gguf_template", [None, "", "{{ raise_exception('nope') }}",
                                           "{% if %}"])
def test_auto_falls_back_to_chatml_and_says_why(gguf_template):
    """auto takes chatml when the GGUF template is absent, broken or refuses the probe."""
    template = select_template("auto", gguf_template, BOS, EOS)
    assert template.name == "chatml"
    assert template.note


def test_gguf_without_a_template_in_the_file_is_refused():
    """Asking for the GGUF template of a file that has none names the alternatives."""
    with pytest.raises(TemplateError, match="chatml"):
        select_template("gguf", None, BOS, EOS)


@pytest.mark.parametrize("name", list(FALLBACK_SOURCES))
def test_an_explicit_fallback_name_is_used_even_when_the_gguf_has_a_template(name):
    """Naming a built-in template overrides the model's own."""
    assert select_template(name, "{{ 'gguf' }}", BOS, EOS).name == name


def test_an_unknown_template_name_lists_the_choices():
    """An unknown name is a ValueError naming every accepted choice."""
    with pytest.raises(ValueError) as info:
        select_template("vicuna", None, BOS, EOS)
    assert all(choice in str(info.value) for choice in TEMPLATE_CHOICES)
