"""Generation through the real Candle forward pass on tiny fixture models."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from candle_phi import Phi3Generator
from conftest import ASSISTANT, CHAT_PROMPT, END, ENDOFTEXT


def run(gen: Phi3Generator, prompt: str = CHAT_PROMPT, **kwargs: object) -> tuple[str, list[str]]:
    stream = gen.generate(prompt, **kwargs)  # type: ignore[arg-type]
    pieces = list(stream)
    return "".join(pieces), pieces


def test_stream_yields_text_and_reports_counts(generator: Phi3Generator) -> None:
    stream = generator.generate(CHAT_PROMPT, max_tokens=12, seed=7, stop_token_ids=None)
    assert stream.finish_reason is None
    pieces = list(stream)
    assert all(isinstance(p, str) and p for p in pieces)
    assert stream.prompt_tokens == len(generator.tokenize(CHAT_PROMPT))
    assert stream.generated_tokens == len(stream.token_ids) <= 12
    assert stream.finish_reason in ("stop", "length")
    if stream.finish_reason == "length":
        assert stream.generated_tokens == 12
    # The stream is exhausted for good.
    assert next(stream, None) is None


def test_same_seed_same_text_other_seed_other_text(generator: Phi3Generator) -> None:
    params = {"max_tokens": 40, "temperature": 1.0, "top_p": None, "top_k": None}
    a = generator.generate(CHAT_PROMPT, seed=123, **params)  # type: ignore[arg-type]
    b = generator.generate(CHAT_PROMPT, seed=123, **params)  # type: ignore[arg-type]
    text_a, text_b = "".join(a), "".join(b)
    assert a.token_ids == b.token_ids and text_a == text_b
    texts = {"".join(generator.generate(CHAT_PROMPT, seed=s, **params)) for s in range(4)}  # type: ignore[arg-type]
    assert len(texts) > 1, "different seeds always gave the same tokens"


def test_no_seed_draws_a_fresh_one(generator: Phi3Generator) -> None:
    seeds = {generator.generate(CHAT_PROMPT, max_tokens=1).seed for _ in range(3)}
    assert len(seeds) == 3


def test_temperature_zero_is_argmax(generator: Phi3Generator) -> None:
    prompt_ids = generator.tokenize(CHAT_PROMPT)
    stream = generator.generate(CHAT_PROMPT, max_tokens=6, temperature=0, repeat_penalty=1.0)
    list(stream)
    ids = prompt_ids + stream.token_ids
    logits = generator.logits(ids)
    for i, token in enumerate(stream.token_ids):
        row = logits[len(prompt_ids) - 1 + i]
        assert token == max(range(len(row)), key=row.__getitem__)


# F32 weights: only the f32 summation order differs. Q8_0 weights: Candle also quantizes each
# activation row to 8 bits for the dot products, so an ulp upstream can flip a rounding step.
@pytest.mark.parametrize(
    ("which", "tol"), [("f32_generator", 1e-4), ("generator", 0.1), ("gqa_generator", 0.1)]
)
def test_batched_prompt_matches_token_by_token(
    which: str, tol: float, request: pytest.FixtureRequest
) -> None:
    gen: Phi3Generator = request.getfixturevalue(which)
    ids = gen.tokenize(CHAT_PROMPT + " and a second sentence, to be longer.")
    assert len(ids) > 20
    batched = gen.logits(ids)
    stepwise = gen.logits(ids, chunk_size=1)
    chunked = gen.logits(ids, chunk_size=7)
    for a, b, c in zip(batched, stepwise, chunked, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < tol
        assert max(abs(x - y) for x, y in zip(a, c, strict=True)) < tol
    assert all(math.isfinite(x) for x in batched[-1])


def test_max_tokens_gives_length(generator: Phi3Generator) -> None:
    stream = generator.generate(CHAT_PROMPT, max_tokens=5, seed=1, stop_token_ids=[])
    list(stream)
    if stream.finish_reason == "length":
        assert stream.generated_tokens == 5
    else:  # an end token came first: it must be a real end token
        assert stream.generated_tokens < 5


def test_max_tokens_zero_generates_nothing(generator: Phi3Generator) -> None:
    stream = generator.generate(CHAT_PROMPT, max_tokens=0)
    assert list(stream) == []
    assert stream.finish_reason == "length" and stream.generated_tokens == 0


@pytest.mark.parametrize("end_token", [END, ENDOFTEXT])
def test_each_end_token_stops_and_is_not_yielded(
    end_token: int,
    scripted: Callable[[list[int]], Phi3Generator],
    token_id: Callable[[str], int],
) -> None:
    hello, world = token_id("▁Hello"), token_id("▁world")
    gen = scripted([hello, world, end_token, token_id("▁the")])
    text, _ = run(gen, max_tokens=20, temperature=0)
    stream = gen.generate(CHAT_PROMPT, max_tokens=20, temperature=0)
    assert "".join(stream) == text == "Hello world"
    assert stream.finish_reason == "stop"
    assert stream.token_ids == [hello, world]
    assert end_token in gen.end_token_ids


def test_caller_stop_token_ids_stop_generation(
    scripted: Callable[[list[int]], Phi3Generator], token_id: Callable[[str], int]
) -> None:
    hello, world, the = token_id("▁Hello"), token_id("▁world"), token_id("▁the")
    gen = scripted([hello, the, world, END])
    stream = gen.generate(CHAT_PROMPT, temperature=0, stop_token_ids=[world])
    assert "".join(stream) == "Hello the"
    assert stream.finish_reason == "stop" and stream.token_ids == [hello, the]


def test_multibyte_utf8_streams_exactly(
    scripted: Callable[[list[int]], Phi3Generator], generator: Phi3Generator
) -> None:
    # Latin-1, kana, an emoji and Greek: none is in the vocabulary, so each is split over
    # byte-fallback tokens.
    text = "éあ🏒α"
    byte_ids = generator.tokenize(text, add_special_tokens=False)
    assert all(3 <= i <= 258 for i in byte_ids[1:]), byte_ids
    gen = scripted([*byte_ids, END])
    stream = gen.generate(CHAT_PROMPT, temperature=0)
    pieces = list(stream)
    assert "".join(pieces) == gen.detokenize(stream.token_ids, skip_special_tokens=True)
    assert "".join(pieces).strip() == text
    assert not any("\ufffd" in p for p in pieces)
    # Every character comes out as soon as its last byte is generated.
    assert [p.strip() for p in pieces if p.strip()] == list(text)


def test_a_byte_that_turns_released_bytes_invalid_does_not_fail_the_stream(
    scripted: Callable[[list[int]], Phi3Generator], generator: Phi3Generator
) -> None:
    # <0x1A> is valid UTF-8 alone and is released at once; <0xDA> after it makes the run
    # invalid, and `tokenizers` then decodes both bytes as U+FFFD. Sampling met this.
    ctrl, lead = 3 + 0x1A, 3 + 0xDA
    word = generator.tokenize("hockey", add_special_tokens=False)[-1]
    tab = 3 + ord("\t")
    gen = scripted([ctrl, lead, word, tab, END])
    stream = gen.generate(CHAT_PROMPT, temperature=0)
    pieces = list(stream)
    assert stream.finish_reason == "stop"
    assert stream.token_ids == [ctrl, lead, word, tab]
    whole = gen.detokenize(stream.token_ids, skip_special_tokens=True)
    assert whole.startswith("\ufffd\ufffd") and whole.endswith("hockey\t")
    # The released "\x1a" stays; what follows is the full decode's text after it.
    assert "".join(pieces) == "\x1a" + whole


def test_spaces_and_punctuation_are_not_held_back(
    scripted: Callable[[list[int]], Phi3Generator], token_id: Callable[[str], int]
) -> None:
    script = [token_id("▁Hello"), token_id(","), token_id("▁world"), token_id("!"), END]
    gen = scripted(script)
    stream = gen.generate(CHAT_PROMPT, temperature=0)
    assert [next(stream) for _ in range(4)] == ["Hello", ",", " world", "!"]
    assert next(stream, None) is None


def test_random_text_joins_to_full_decode(generator: Phi3Generator) -> None:
    # Random weights over a vocabulary of CJK fillers, ASCII and byte tokens.
    for seed in range(3):
        stream = generator.generate(
            CHAT_PROMPT, max_tokens=60, temperature=1.5, top_k=None, top_p=None, seed=seed
        )
        text = "".join(stream)
        assert text == generator.detokenize(stream.token_ids, skip_special_tokens=True)


def test_scripted_fixture_is_what_the_model_computes(
    scripted: Callable[[list[int]], Phi3Generator], token_id: Callable[[str], int]
) -> None:
    # Guards the other scripted tests: the script is an outcome of the forward pass.
    gen = scripted([token_id("▁Hello"), token_id("▁world"), END, token_id("▁the")])
    ids = gen.tokenize(CHAT_PROMPT)
    assert ids[-1] == ASSISTANT
    row = gen.logits(ids)[-1]
    assert max(range(len(row)), key=row.__getitem__) == token_id("▁Hello")


def test_prompt_as_token_ids(generator: Phi3Generator) -> None:
    ids = generator.tokenize(CHAT_PROMPT)
    from_ids = generator.generate(ids, max_tokens=10, seed=4)
    from_text = generator.generate(CHAT_PROMPT, max_tokens=10, seed=4)
    assert from_ids.read() == from_text.read()
    assert from_ids.prompt_token_ids == ids


def test_ignore_eos_generates_past_end_tokens(
    scripted: Callable[[list[int]], Phi3Generator], token_id: Callable[[str], int]
) -> None:
    hello, world, the = token_id("▁Hello"), token_id("▁world"), token_id("▁the")
    gen = scripted([hello, world, END, the])
    stream = gen.generate(CHAT_PROMPT, temperature=0, max_tokens=4, ignore_eos=True)
    assert stream.read() == "Hello world the"  # the end token itself has no text
    assert stream.token_ids == [hello, world, END, the]
    assert stream.finish_reason == "length"
    # Caller stop tokens still apply.
    stream = gen.generate(CHAT_PROMPT, temperature=0, ignore_eos=True, stop_token_ids=[the])
    assert stream.read() == "Hello world" and stream.finish_reason == "stop"
