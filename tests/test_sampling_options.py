"""min_p, presence_penalty, frequency_penalty and logit_bias, checked against the model's raw
logits (``gen.logits``, an independent replay of each step) transformed in NumPy as documented:
repeat_penalty, then presence/frequency over the tokens generated so far, then logit_bias
(-100 bans), then min_p measured on the raw probabilities before temperature."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import phi3_fixtures as fx
import pytest
from candle_phi import InvalidArgumentError, Phi3Generator
from conftest import ASSISTANT, CHAT_PROMPT, END

GENERATORS = ["generator", "f32_generator"]
# High temperature, no top-k or nucleus cut: without another filter any token may come.
WILD = {"temperature": 5.0, "top_k": None, "top_p": None, "repeat_penalty": 1.0}
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


def rows(gen: Phi3Generator, prompt_ids: list[int], generated: list[int]) -> np.ndarray:
    """Raw logits before each generated token (and after the last one), in float64."""
    logits = np.asarray(gen.logits(prompt_ids + generated), dtype=np.float64)
    return logits[len(prompt_ids) - 1 :]


def generate(gen: Phi3Generator, prompt: Any = CHAT_PROMPT, **options: Any) -> list[int]:
    stream = gen.generate(prompt, **options)
    stream.read()
    return stream.token_ids


def transformed(
    raw: np.ndarray,
    generated: list[int],
    presence: float = 0.0,
    frequency: float = 0.0,
    bias: dict[int, float] | None = None,
    repeat: float = 1.0,
) -> np.ndarray:
    """The documented transform of one row of logits, given the tokens generated before it."""
    out = raw.copy()
    for token in set(generated):  # repeat_penalty, llama.cpp style: once per distinct token
        out[token] = out[token] / repeat if out[token] > 0 else out[token] * repeat
    for token, count in Counter(generated).items():
        out[token] -= presence + frequency * count
    for token, value in (bias or {}).items():
        out[token] = -math.inf if value == -100 else out[token] + value
    return out


def ranked(row: np.ndarray) -> list[int]:
    return [int(t) for t in np.argsort(-row, kind="stable")]


# --------------------------------------------------------------------------- neutral values


def test_neutral_values_change_nothing(generator: Phi3Generator) -> None:
    # Without prefix reuse, which changes the logits in the last bits (and, through them, can
    # change a sampled token): every stream computes its prompt afresh.
    generator = Phi3Generator(
        generator.model_path, tokenizer=generator.tokenizer_path, prefix_cache_bytes=0
    )
    neutral: dict[str, Any] = {"min_p": 0.0, "logit_bias": {}}
    neutral |= {"presence_penalty": 0.0, "frequency_penalty": 0.0}
    sampled = []
    for seed in range(4):
        plain = generate(generator, max_tokens=12, seed=seed)
        sampled.append(plain)
        for extra in ({}, {"logit_bias": None}, {"logprobs": True, "top_logprobs": 5}):
            assert generate(generator, max_tokens=12, seed=seed, **(neutral | extra)) == plain
        assert generate(generator, max_tokens=12, seed=seed, logprobs=False) == plain
    assert len({tuple(s) for s in sampled}) > 1  # the seeds did sample


# --------------------------------------------------------------------------- logit_bias


def test_bias_plus_100_forces_a_token_every_step(
    generator: Phi3Generator, token_id: Callable[[str], int]
) -> None:
    the = token_id("▁the")
    for seed in range(3):
        stream = generator.generate(
            CHAT_PROMPT, max_tokens=8, seed=seed, temperature=1.0, logit_bias={the: 100}
        )
        assert stream.read() == generator.detokenize([the] * 8)
        assert stream.token_ids == [the] * 8 and stream.finish_reason == "length"
    # On an end token, it ends the stream at once.
    stream = generator.generate(CHAT_PROMPT, max_tokens=8, seed=0, logit_bias={END: 100.0})
    assert stream.read() == "" and stream.finish_reason == "stop" and stream.token_ids == []


@pytest.mark.parametrize("which", GENERATORS)
def test_bias_minus_100_bans_the_greedy_token(which: str, request: pytest.FixtureRequest) -> None:
    gen: Phi3Generator = request.getfixturevalue(which)
    prompt_ids = gen.tokenize(CHAT_PROMPT)
    first, second, third = ranked(rows(gen, prompt_ids, [])[0])[:3]
    assert generate(gen, max_tokens=1, **GREEDY) == [first]
    assert generate(gen, max_tokens=1, logit_bias={first: -100}, **GREEDY) == [second]
    banned = {first: -100.0, second: -100.0}
    assert generate(gen, max_tokens=1, logit_bias=banned, **GREEDY) == [third]


@pytest.fixture(scope="module")
def dominant(tmp_path_factory: pytest.TempPathFactory, generator: Phi3Generator) -> Phi3Generator:
    """Greedy output "Hello world", whose first token leads the others by over 100 logits (a
    scripted model leads by 10 * sqrt(hidden_size))."""
    path = tmp_path_factory.mktemp("dominant") / "scripted-256.gguf"
    config = fx.TinyPhi3Config(hidden_size=256, intermediate_size=256, context_length=64)
    script = [generator.token_to_id("▁Hello"), generator.token_to_id("▁world"), END]
    fx.write_phi3_gguf(path, config, script=script, trigger_token=ASSISTANT)  # type: ignore[arg-type]
    return Phi3Generator(path, tokenizer=generator.tokenizer_path)


def test_minus_100_bans_even_a_token_leading_by_more_than_100(
    dominant: Phi3Generator, token_id: Callable[[str], int]
) -> None:
    hello = token_id("▁Hello")
    row = rows(dominant, dominant.tokenize(CHAT_PROMPT), [])[0]
    assert row[hello] - np.delete(row, hello).max() > 110
    assert generate(dominant, max_tokens=1, **GREEDY) == [hello]
    # -99 is only added: the token still leads.
    assert generate(dominant, max_tokens=1, logit_bias={hello: -99.0}, **GREEDY) == [hello]
    assert generate(dominant, max_tokens=1, logit_bias={hello: -100}, **GREEDY) != [hello]
    firsts = [
        generate(dominant, max_tokens=1, seed=s, logit_bias={hello: -100}, **WILD)[0]
        for s in range(8)
    ]
    assert hello not in firsts and len(set(firsts)) > 1


@pytest.mark.parametrize("which", GENERATORS)
def test_positive_bias_wins_exactly_past_the_logit_gap(
    which: str, request: pytest.FixtureRequest
) -> None:
    gen: Phi3Generator = request.getfixturevalue(which)
    row = rows(gen, gen.tokenize(CHAT_PROMPT), [])[0]
    order = ranked(row)
    for rank in (1, 4, 50):
        token = order[rank]
        gap = float(row[order[0]] - row[token])
        assert generate(gen, max_tokens=1, logit_bias={token: gap - 0.02}, **GREEDY) == order[:1]
        assert generate(gen, max_tokens=1, logit_bias={token: gap + 0.02}, **GREEDY) == [token]


# --------------------------------------------------------------------------- penalties + bias


# (presence, frequency, repeat_penalty, boost a mid-ranked token by, ban the first argmax)
REPLAYS = [
    pytest.param(0.0, 0.0, 1.0, 4.0, True, id="logit_bias"),
    pytest.param(2.0, 0.0, 1.0, 5.0, False, id="presence"),
    pytest.param(0.0, 2.0, 1.0, 6.0, False, id="frequency"),
    pytest.param(-2.0, 0.0, 1.0, 0.0, False, id="negative_presence"),
    pytest.param(0.0, -2.0, 1.0, 0.0, False, id="negative_frequency"),
    pytest.param(1.0, 0.7, 1.5, 4.0, True, id="all_with_repeat_penalty"),
]


@pytest.mark.parametrize("which", GENERATORS)
@pytest.mark.parametrize(("presence", "frequency", "repeat", "boost", "ban"), REPLAYS)
def test_greedy_tokens_are_the_argmax_of_the_transformed_logits(
    which: str, presence: float, frequency: float, repeat: float, boost: float, ban: bool,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    gen: Phi3Generator = request.getfixturevalue(which)
    prompt_ids = gen.tokenize(CHAT_PROMPT)
    order = ranked(rows(gen, prompt_ids, [])[0])
    bias = {order[10]: boost} if boost else {}
    if ban:
        bias[order[0]] = -100.0
    options = {"presence_penalty": presence, "frequency_penalty": frequency, "logit_bias": bias}
    tokens = generate(gen, max_tokens=10, temperature=0, repeat_penalty=repeat, **options)
    assert len(tokens) == 10
    raw = rows(gen, prompt_ids, tokens)
    penalties_mattered = bias_mattered = 0
    for i, token in enumerate(tokens):
        before = tokens[:i]
        full = transformed(raw[i], before, presence, frequency, bias, repeat)
        assert int(full.argmax()) == token, f"step {i}: {tokens}"
        without_penalties = transformed(raw[i], before, bias=bias, repeat=repeat)
        without_bias = transformed(raw[i], before, presence, frequency, None, repeat)
        penalties_mattered += int(without_penalties.argmax()) != token
        bias_mattered += int(without_bias.argmax()) != token
    # Guards: the options under test decided at least one step.
    if presence or frequency:
        assert penalties_mattered, tokens
    if bias:
        assert bias_mattered, tokens


@pytest.mark.parametrize(("presence", "frequency"), [(2.0, 0.0), (0.0, 0.7), (1.2, 0.5)])
def test_penalties_count_generated_tokens_not_the_prompt(
    generator: Phi3Generator, token_id: Callable[[str], int], presence: float, frequency: float
) -> None:
    the = token_id("▁the")
    prompt_ids = generator.tokenize(CHAT_PROMPT) + [the] * 3
    row = rows(generator, prompt_ids, [])[0]
    # Biased to lead by 1: three prompt occurrences, if counted, would cost it the lead.
    lead = {the: float(np.delete(row, the).max() - row[the]) + 1.0}
    assert presence + 3 * frequency > 1.5
    options = {"presence_penalty": presence, "frequency_penalty": frequency, "logit_bias": lead}
    assert generate(generator, prompt_ids, max_tokens=1, **options, **GREEDY) == [the]


# --------------------------------------------------------------------------- min_p


@pytest.mark.parametrize("which", GENERATORS)
def test_min_p_near_one_keeps_only_the_argmax(which: str, request: pytest.FixtureRequest) -> None:
    gen: Phi3Generator = request.getfixturevalue(which)
    greedy = generate(gen, max_tokens=8, **GREEDY)
    raw = rows(gen, gen.tokenize(CHAT_PROMPT), greedy)
    top2 = np.sort(raw[:8], axis=1)[:, -2:]
    # No near-tie at any step: min_p=0.999 then keeps the argmax alone, with a margin (0.4%)
    # above the 2e-3 by which these logits (one pass) and the stream's (step by step, through
    # an f16 cache) may differ.
    assert np.all(np.exp(top2[:, 0] - top2[:, 1]) < 0.995)
    sampled = [generate(gen, max_tokens=8, seed=s, **WILD) for s in range(4)]
    assert all(s != greedy for s in sampled)  # without min_p the temperature shows
    for seed in range(4):
        assert generate(gen, max_tokens=8, seed=seed, min_p=0.999, **WILD) == greedy


@pytest.mark.parametrize("which", GENERATORS)
def test_min_p_keeps_exactly_the_tokens_above_its_share_of_the_raw_max(
    which: str, request: pytest.FixtureRequest
) -> None:
    gen: Phi3Generator = request.getfixturevalue(which)
    row = rows(gen, gen.tokenize(CHAT_PROMPT), [])[0]
    ratios = np.sort(np.exp(row - row.max()))[::-1]  # p / p_max, before temperature
    # The threshold midway across the widest step among the top few: no token near it.
    keep = max(range(2, 8), key=lambda k: ratios[k - 1] - ratios[k])
    assert ratios[keep - 1] - ratios[keep] > 0.01
    min_p = float(ratios[keep - 1] + ratios[keep]) / 2
    allowed = set(ranked(row)[:keep])
    firsts = [generate(gen, max_tokens=1, seed=s, min_p=min_p, **WILD)[0] for s in range(48)]
    assert set(firsts) == allowed, (keep, min_p)
    # At temperature 5 the ratios measured after it would let far more tokens through.
    assert np.sum(np.exp((row - row.max()) / WILD["temperature"]) >= min_p) > 10 * keep
    unfiltered = [generate(gen, max_tokens=1, seed=s, **WILD)[0] for s in range(8)]
    assert not set(unfiltered) <= allowed


# --------------------------------------------------------------------------- validation

BAD_VALUES = [
    *(("min_p", v) for v in (math.nan, math.inf, -0.1, 1.01, "0.5", None, [0.1])),
    *(
        (name, v)
        for name in ("presence_penalty", "frequency_penalty")
        for v in (math.nan, math.inf, -math.inf, -3, 2.5, -2.0001, "1", None)
    ),
    *(
        ("logit_bias", v)
        for v in (
            {0: 101}, {0: -100.5}, {0: math.nan}, {0: math.inf}, {0: "1"}, {0: None},
            {"a": 1}, {"5": 1.0}, {1.5: 1.0}, {True: 1.0}, {-1: 1.0}, {32064: 1.0},
            {10**20: 1.0}, [1], [(5, 1.0)], "x", 5,
        )
    ),
    *(("top_logprobs", v) for v in (21, -1, 2.5, "3", True, 10**20)),
    *(("logprobs", v) for v in ("yes", 1, None, 0.0)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=repr)
def test_bad_value_raises_naming_the_option(
    generator: Phi3Generator, name: str, value: Any
) -> None:
    extra = {"logprobs": True} if name == "top_logprobs" else {}
    for start in (
        lambda: generator.generate(CHAT_PROMPT, **{name: value}, **extra),
        lambda: generator.chat([{"role": "user", "content": "Hi"}], **{name: value}, **extra),
    ):
        with pytest.raises(InvalidArgumentError, match=name):
            start()


def test_top_logprobs_needs_logprobs(generator: Phi3Generator) -> None:
    for off in ({}, {"logprobs": False}):
        with pytest.raises(InvalidArgumentError, match="top_logprobs.*logprobs"):
            generator.generate(CHAT_PROMPT, top_logprobs=3, **off)


@pytest.mark.parametrize("misspelt", ["minp", "presence", "logit_biases", "logprob", "top_logprob"])
def test_unknown_option_is_a_type_error(generator: Phi3Generator, misspelt: str) -> None:
    with pytest.raises(TypeError, match=misspelt):
        generator.generate(CHAT_PROMPT, **{misspelt: 1})


def test_edge_values_are_accepted(generator: Phi3Generator) -> None:
    for options in (
        {"min_p": 1.0, "presence_penalty": -2, "frequency_penalty": 2},
        {"min_p": 0, "presence_penalty": 2.0, "frequency_penalty": -2.0, "logit_bias": None},
    ):
        stream = generator.generate(CHAT_PROMPT, max_tokens=3, seed=1, **options)  # type: ignore[arg-type]
        assert stream.read() and stream.finish_reason == "length"
    # NumPy keys and values, the last id, both extreme biases, the most top_logprobs.
    bias = {np.int64(5): np.float32(-100.0), generator.vocab_size - 1: 100}
    stream = generator.generate(
        CHAT_PROMPT, max_tokens=3, seed=1, logit_bias=bias, logprobs=True, top_logprobs=20
    )
    stream.read()
    assert stream.token_ids == [generator.vocab_size - 1] * 3
    assert stream.logprobs is not None and all(len(e.top_logprobs) == 20 for e in stream.logprobs)
