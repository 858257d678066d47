"""Sampling on logits, UTF-8 detokenisation of byte pieces, and stop-string matching."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.engine.sampling import Sampler, StopMatcher, Utf8Detokenizer, first_stop
from schemas.chat import SamplingParams

N_VOCAB = 1000
EOS = 2


def logits_sequence(n: int, seed: int = 0, vocab: int = N_VOCAB) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(vocab) * 2).astype(np.float32) for _ in range(n)]


def run(params: SamplingParams, steps: list[np.ndarray], recent=()) -> list[int]:
    sampler = Sampler(params, EOS, N_VOCAB)
    return [sampler.sample(z, list(recent)) for z in steps]


def peaked(*favourites: int, value: float = 10.0) -> np.ndarray:
    z = np.full(N_VOCAB, -10.0, dtype=np.float32)
    for token in favourites:
        z[token] = value
    return z


# -- Sampler --------------------------------------------------------------------------------
def test_greedy_picks_the_argmax_whatever_the_seed_and_penalty():
    """Temperature 0 is argmax of the raw logits; seed and penalty change nothing."""
    steps = logits_sequence(20)
    expected = [int(np.argmax(z)) for z in steps]
    for seed in (None, 1, 2):
        params = SamplingParams(temperature=0.0, seed=seed, repeat_penalty=2.0)
        assert run(params, steps, recent=expected) == expected


def test_top_k_of_one_picks_the_argmax_at_any_temperature():
    """top_k=1 leaves only the most likely token."""
    steps = logits_sequence(20)
    params = SamplingParams(temperature=1.5, top_k=1, repeat_penalty=1.0)
    assert run(params, steps) == [int(np.argmax(z)) for z in steps]


def test_the_same_seed_gives_the_same_tokens():
    """Same seed and same logits sequence give the same tokens."""
    steps = logits_sequence(50)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=7)
    assert run(params, steps) == run(params, steps)


def test_different_seeds_give_different_tokens():
    """The seed drives the draw: two seeds disagree somewhere over 50 flat-ish steps."""
    steps = logits_sequence(50)
    a = run(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1), steps)
    b = run(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=2), steps)
    assert a != b


def test_sampling_never_leaves_the_top_k():
    """Every draw is among the k largest logits."""
    steps = logits_sequence(200)
    tokens = run(SamplingParams(temperature=2.0, top_k=5, top_p=1.0, seed=3), steps)
    for z, token in zip(steps, tokens, strict=True):
        assert token in set(np.argsort(z)[-5:].tolist())


def test_top_p_keeps_only_the_nucleus():
    """With one token holding ~95% of the mass, top_p=0.5 always picks it."""
    z = peaked(42, value=5.0)  # e^5 vs 999 * e^-10: token 42 holds nearly all mass
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.5, seed=4)
    assert set(run(params, [z] * 200)) == {42}


def test_draws_follow_the_softmax_of_the_candidates():
    """Two equally likely tokens are each drawn about half the time."""
    z = peaked(10, 20)
    tokens = run(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=5), [z] * 2000)
    assert set(tokens) == {10, 20}
    assert 0.4 < tokens.count(10) / len(tokens) < 0.6


def test_repetition_penalty_steers_away_from_recent_tokens():
    """A token just used loses to a slightly less likely one when the penalty is strong."""
    z = peaked(7, value=2.0)
    z[8] = 1.5
    params = SamplingParams(temperature=0.05, top_k=0, top_p=1.0, repeat_penalty=2.0, seed=6)
    assert set(run(params, [z] * 50, recent=[7])) == {8}
    assert set(run(params, [z] * 50, recent=[3])) == {7}


def test_repetition_penalty_pushes_negative_logits_further_down():
    """A negative logit is multiplied by the penalty, so a recent token drops below others."""
    z = np.full(N_VOCAB, -50.0, dtype=np.float32)
    z[7], z[8] = -1.0, -1.5
    params = SamplingParams(temperature=0.05, top_k=0, top_p=1.0, repeat_penalty=2.0, seed=6)
    assert set(run(params, [z] * 50, recent=[7])) == {8}


def test_repetition_penalty_looks_only_at_the_last_n_tokens():
    """A token older than repeat_last_n is not penalised."""
    z = peaked(7, value=2.0)
    z[8] = 1.5
    params = SamplingParams(temperature=0.05, top_k=0, top_p=1.0, repeat_penalty=2.0,
                            repeat_last_n=2, seed=6)
    assert set(run(params, [z] * 20, recent=[7, 1, 1])) == {7}


def test_frequency_penalty_grows_with_each_use_of_a_token():
    """Used once, a token still wins by a margin; used three times, the penalty overturns it."""
    z = peaked(7, value=2.0)
    z[8] = 1.0
    params = SamplingParams(temperature=0.05, top_k=0, top_p=1.0, repeat_penalty=1.0,
                            frequency_penalty=0.6, seed=6)
    assert set(run(params, [z] * 50, recent=[7])) == {7}
    assert set(run(params, [z] * 50, recent=[7, 7, 7])) == {8}


def test_presence_penalty_counts_a_token_once_however_often_it_was_used():
    """Presence subtracts a fixed amount from any used token, however often it was used."""
    z = peaked(7, value=2.0)
    z[8] = 1.0
    mild = SamplingParams(temperature=0.05, top_k=0, top_p=1.0, repeat_penalty=1.0,
                          presence_penalty=0.5, seed=6)
    assert set(run(mild, [z] * 50, recent=[7, 7, 7, 7])) == {7}
    strong = mild.model_copy(update={"presence_penalty": 1.5})
    assert set(run(strong, [z] * 50, recent=[7])) == {8}
    boost = mild.model_copy(update={"presence_penalty": -1.5})
    z[8] = 2.5
    assert set(run(boost, [z] * 50, recent=[7])) == {7}


def test_the_eos_token_is_never_penalised():
    """EOS stays as likely as ever even when it appears in the recent tokens."""
    z = peaked(EOS, value=2.0)
    z[8] = 1.5
    params = SamplingParams(temperature=0.05, top_k=0, top_p=1.0, repeat_penalty=2.0, seed=6)
    assert set(run(params, [z] * 50, recent=[EOS])) == {EOS}


def test_sampling_leaves_the_callers_logits_untouched():
    """The backend's logits buffer is read, never written."""
    z = logits_sequence(1)[0]
    before = z.copy()
    run(SamplingParams(temperature=0.8, top_k=0, top_p=0.9, seed=1), [z], recent=range(50))
    np.testing.assert_array_equal(z, before)


def test_a_large_vocabulary_with_default_settings_samples_in_range():
    """On a 152k vocabulary with top_k=0 and top_p<1, the token is valid and in the nucleus."""
    vocab = 152_064
    z = logits_sequence(1, vocab=vocab)[0]
    z[123_456] = 40.0
    sampler = Sampler(SamplingParams(top_k=0, top_p=0.9, seed=9), EOS, vocab)
    assert sampler.sample(z, []) == 123_456


# -- Utf8Detokenizer ------------------------------------------------------------------------
def test_a_four_byte_emoji_split_over_pieces_is_held_back_until_complete():
    """No partial character, and no U+FFFD, is emitted for an emoji split in three."""
    data = "a😀b".encode()  # emoji is 4 bytes: F0 9F 98 80
    detok = Utf8Detokenizer()
    assert detok.feed(data[:2]) == "a"
    assert detok.feed(data[2:4]) == ""
    assert detok.pending == data[1:4]
    assert detok.feed(data[4:]) == "😀b"
    assert detok.flush() == ""


def test_bytes_that_can_never_complete_are_replaced_at_once():
    """An invalid byte becomes U+FFFD immediately instead of blocking the stream."""
    detok = Utf8Detokenizer()
    assert detok.feed(b"\xff") == "\ufffd"
    assert detok.feed(b"\xf0(") == "\ufffd("


def test_flush_replaces_an_incomplete_tail():
    """At the end of the stream, a dangling lead byte becomes U+FFFD."""
    detok = Utf8Detokenizer()
    assert detok.feed("é".encode()[:1]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.feed(b"ok") == "ok"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), cuts=st.lists(st.integers(0, 64), max_size=10))
def test_detokenizer_output_equals_decoding_the_whole_stream(data, cuts):
    """Property: however bytes are split into pieces, no byte is lost or decoded twice."""
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    detok = Utf8Detokenizer()
    text = "".join(detok.feed(data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    assert text + detok.flush() == data.decode("utf-8", errors="replace")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=30), cuts=st.lists(st.integers(0, 200), max_size=10))
def test_valid_text_never_yields_a_replacement_character(text, cuts):
    """Property: valid UTF-8 cut anywhere decodes without U+FFFD."""
    data = text.encode()
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    detok = Utf8Detokenizer()
    pieces = [detok.feed(data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert "".join(pieces) + detok.flush() == text


# -- StopMatcher ----------------------------------------------------------------------------
def test_a_stop_string_split_across_feeds_is_found_and_never_emitted():
    """'###' arriving as '#', '#', '#' stops the stream without emitting any '#'."""
    stopper = StopMatcher(["###"])
    assert stopper.feed("Hello #") == ("Hello ", False)
    assert stopper.feed("#") == ("", False)
    assert stopper.feed("# more") == ("", True)
    assert stopper.stopped
    assert stopper.feed("after") == ("", True)


def test_a_false_start_is_released_when_it_cannot_be_a_stop():
    """Held-back text is emitted as soon as it no longer begins a stop string."""
    stopper = StopMatcher(["</end>"])
    assert stopper.feed("a </e") == ("a ", False)
    assert stopper.feed("x") == ("</ex", False)


def test_the_stop_string_completed_first_wins():
    """The stream ends where a stop string first completes, cut at the earliest start."""
    assert StopMatcher(["world", "lo w"]).feed("hello world") == ("hel", True)
    assert StopMatcher(["#aa", "a"]).feed("#aa") == ("#", True)


def test_first_stop_of_text_without_stops_is_none():
    """first_stop returns None when no stop string occurs."""
    assert first_stop("hello", ["x", ""]) is None
    assert first_stop("hello", ["ll"]) == 2


def test_flush_emits_what_was_held_back_at_the_end():
    """When the stream ends mid-candidate, the held text is not lost."""
    stopper = StopMatcher(["STOP"])
    assert stopper.feed("abc ST") == ("abc ", False)
    assert stopper.flush() == "ST"


def test_no_stops_emit_everything_at_once():
    """Without stop strings (or only empty ones) nothing is held back."""
    stopper = StopMatcher(["", ""])
    assert stopper.feed("abc") == ("abc", False)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab#\n", max_size=40),
    stops=st.lists(st.text(alphabet="ab#\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_matching_does_not_depend_on_how_text_is_split(text, stops, cuts):
    """Property: any split emits what feeding one character at a time emits."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    stopper = StopMatcher(stops)
    out, stopped = [], False
    for a, b in zip(bounds, bounds[1:], strict=False):
        piece, stopped = stopper.feed(text[a:b])
        out.append(piece)
        if stopped:
            break
    if not stopped:
        out.append(stopper.flush())
    one_by_one = StopMatcher(stops)
    expected = []
    for ch in text:
        piece, done = one_by_one.feed(ch)
        expected.append(piece)
        if done:
            break
    if not one_by_one.stopped:
        expected.append(one_by_one.flush())
    assert "".join(out) == "".join(expected)
    assert stopped == one_by_one.stopped == any(s in text for s in stops)


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(top_k=0, top_p=0.95),
    SamplingParams(top_k=0, top_p=1.0, repeat_penalty=1.0),
])
def test_every_setting_returns_a_valid_token(params):
    """Defaults and the full-vocabulary paths all return an id inside the vocabulary."""
    tokens = run(params, logits_sequence(30), recent=range(64))
    assert all(0 <= t < N_VOCAB for t in tokens)
