"""Log-probabilities (``logprobs``, ``top_logprobs``) and token events, against NumPy's
log-softmax (float64) of the model's raw logits from ``gen.logits``: each reported value is
the raw distribution's, before temperature, penalties and filters."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from candle_phi import Phi3Generator, TokenEvent, TokenLogprob, TokenStream
from conftest import CHAT_PROMPT, END

TOL = 1e-4
# Every filter and transform on, so that the sampling distribution is far from the raw one.
SAMPLING: dict[str, Any] = {
    "temperature": 1.3,
    "top_k": 20,
    "top_p": 0.9,
    "min_p": 0.05,
    "repeat_penalty": 1.3,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.4,
}

Scripted = Callable[[list[int]], Phi3Generator]


@pytest.fixture(scope="module", params=["generator", "f32_generator"])
def gen(request: pytest.FixtureRequest) -> Phi3Generator:
    """The fixture model without prefix reuse: every stream computes its prompt afresh, so
    two streams with one seed sample the same tokens (a reused prefix changes the logits in
    the last bits, and can change a sampled token)."""
    shared: Phi3Generator = request.getfixturevalue(request.param)
    return Phi3Generator(shared.model_path, tokenizer=shared.tokenizer_path, prefix_cache_bytes=0)


def log_softmax(rows: Any) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reference(gen: Phi3Generator, stream: TokenStream) -> np.ndarray:
    """log_softmax of the raw logits before each generated token. One pass over prompt and
    generated tokens: by causality, row i is gen.logits(prompt + generated[:i])[-1]."""
    prompt = stream.prompt_token_ids
    logits = gen.logits(prompt + stream.token_ids)
    return log_softmax(logits[len(prompt) - 1 : -1])


def check_entries(
    entries: list[TokenLogprob], token_ids: list[int], ref: np.ndarray, k: int
) -> None:
    assert [e.token_id for e in entries] == token_ids
    for i, entry in enumerate(entries):
        row = ref[i]
        assert isinstance(entry.logprob, float)
        assert abs(entry.logprob - row[entry.token_id]) < TOL, (i, entry)
        top = entry.top_logprobs
        assert len(top) == k
        ids = [t.token_id for t in top]
        values = [t.logprob for t in top]
        assert len(set(ids)) == k
        assert values == sorted(values, reverse=True)
        # The k highest values (ties may list any of the tied ids), each its id's own.
        assert np.allclose(values, np.sort(row)[::-1][:k], atol=TOL, rtol=0)
        assert all(abs(t.logprob - row[t.token_id]) < TOL for t in top)


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_logprobs_are_the_raw_log_softmax(gen: Phi3Generator, k: int) -> None:
    stream = gen.generate(
        CHAT_PROMPT, max_tokens=12, seed=k, logprobs=True, top_logprobs=k, **SAMPLING
    )
    assert stream.read()
    entries = stream.logprobs
    assert entries is not None and len(entries) == stream.generated_tokens == 12
    ref = reference(gen, stream)
    check_entries(entries, stream.token_ids, ref, k)
    # Guard: after temperature the values would differ beyond the tolerance.
    tempered = log_softmax(np.asarray(gen.logits(stream.prompt_token_ids)[-1]) / 1.3)
    assert abs(tempered[stream.token_ids[0]] - entries[0].logprob) > 100 * TOL
    # The same generation without logprobs samples the same tokens.
    plain = gen.generate(CHAT_PROMPT, max_tokens=12, seed=k, **SAMPLING)
    plain.read()
    assert plain.token_ids == stream.token_ids and plain.logprobs is None


def test_greedy_token_is_the_top_logprob(gen: Phi3Generator) -> None:
    stream = gen.generate(
        CHAT_PROMPT, max_tokens=8, temperature=0, repeat_penalty=1.0, logprobs=True, top_logprobs=3
    )
    stream.read()
    assert stream.logprobs is not None
    check_entries(stream.logprobs, stream.token_ids, reference(gen, stream), 3)
    for entry in stream.logprobs:
        assert entry.top_logprobs[0].token_id == entry.token_id
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert entry.logprob < 0  # a flat random model: never certain


def test_logprobs_off_by_default(generator: Phi3Generator) -> None:
    for off in ({}, {"logprobs": False}, {"logprobs": False, "top_logprobs": 0}):
        stream = generator.generate(CHAT_PROMPT, max_tokens=4, seed=1, **off)  # type: ignore[arg-type]
        events = list(stream.events())
        assert stream.token_ids and stream.logprobs is None
        assert all(event.logprobs is None for event in events)


def test_logprobs_grow_with_the_stream(generator: Phi3Generator) -> None:
    stream = generator.generate(CHAT_PROMPT, max_tokens=6, seed=2, logprobs=True)
    assert stream.logprobs == []
    steps = 0
    for _ in stream:
        steps += 1
        assert stream.logprobs is not None
        assert [e.token_id for e in stream.logprobs] == stream.token_ids
    assert steps > 1 and len(stream.token_ids) == stream.generated_tokens > 1


def test_end_token_is_not_reported(scripted: Scripted, token_id: Callable[[str], int]) -> None:
    hello, world = token_id("▁Hello"), token_id("▁world")
    gen = scripted([hello, world, END])
    stream = gen.generate(CHAT_PROMPT, temperature=0, logprobs=True, top_logprobs=2)
    assert stream.read() == "Hello world" and stream.finish_reason == "stop"
    assert stream.logprobs is not None and len(stream.logprobs) == stream.generated_tokens == 2
    check_entries(stream.logprobs, [hello, world], reference(gen, stream), 2)
    # The scripted tokens lead by ~80 logits: near-certain.
    assert all(-1e-3 < e.logprob <= 0 for e in stream.logprobs)
    # Past the end token (ignore_eos) it is a generated token like the others.
    stream = gen.generate(CHAT_PROMPT, temperature=0, max_tokens=3, ignore_eos=True, logprobs=True)
    stream.read()
    assert stream.logprobs is not None
    assert [e.token_id for e in stream.logprobs] == [hello, world, END]


def test_chat_reports_logprobs(f32_generator: Phi3Generator) -> None:
    messages = [{"role": "user", "content": "Write a haiku about ice hockey"}]
    stream = f32_generator.chat(
        messages,  # type: ignore[arg-type]
        max_tokens=6,
        seed=3,
        logprobs=True,
        top_logprobs=4,
        **SAMPLING,
    )
    stream.read()
    assert stream.logprobs is not None and len(stream.logprobs) == stream.generated_tokens
    check_entries(stream.logprobs, stream.token_ids, reference(f32_generator, stream), 4)


# --------------------------------------------------------------------------- events


def check_events(events: list[TokenEvent], stream: TokenStream, text: str) -> None:
    """Events against the stream they came from, and ``text`` (the same generation read as
    a plain str stream)."""
    assert "".join(e.text for e in events) == text
    assert [t for e in events for t in e.token_ids] == stream.token_ids
    assert all(e.token_ids for e in events)
    if stream.logprobs is None:
        assert all(e.logprobs is None for e in events)
        return
    for event in events:
        assert event.logprobs is not None
        assert [lp.token_id for lp in event.logprobs] == event.token_ids
    flat = [(lp.token_id, lp.logprob) for e in events for lp in e.logprobs or []]
    assert flat == [(lp.token_id, lp.logprob) for lp in stream.logprobs]


@pytest.mark.parametrize("logprobs", [False, True])
def test_events_match_the_text_stream(gen: Phi3Generator, logprobs: bool) -> None:
    options = {"max_tokens": 24, "seed": 11, "logprobs": logprobs, **SAMPLING}
    text = "".join(gen.generate(CHAT_PROMPT, **options))
    stream = gen.generate(CHAT_PROMPT, **options)
    events = list(stream.events())
    assert events[0].text and stream.finish_reason == "length"
    check_events(events, stream, text)
    if logprobs:
        assert stream.logprobs is not None
        check_entries(stream.logprobs, stream.token_ids, reference(gen, stream), 0)


@pytest.mark.parametrize("stop", [None, "あ", "world"])
def test_events_of_multibyte_characters_and_stop_strings(
    scripted: Scripted, generator: Phi3Generator, token_id: Callable[[str], int], stop: str | None
) -> None:
    # Each character of "éあ🏒" is split over 2 to 4 byte-fallback tokens: an event carries
    # all of a character's tokens, and their logprobs.
    chars = generator.tokenize("éあ🏒", add_special_tokens=False)[1:]
    assert len(chars) == 9
    gen = scripted([token_id("▁Hello"), token_id("▁world"), *chars, token_id("▁the"), END])
    text = gen.generate(CHAT_PROMPT, temperature=0, stop=stop).read()
    stream = gen.generate(CHAT_PROMPT, temperature=0, stop=stop, logprobs=True, top_logprobs=1)
    events = list(stream.events())
    check_events(events, stream, text)
    assert stream.logprobs is not None
    check_entries(stream.logprobs, stream.token_ids, reference(gen, stream), 1)
    if stop is None:
        assert [len(e.token_ids) for e in events] == [1, 1, 2, 3, 4, 1]
        assert text == "Hello worldéあ🏒 the"


def test_events_share_progress_with_the_stream(gen: Phi3Generator) -> None:
    options: dict[str, Any] = {"max_tokens": 10, "seed": 5, "logprobs": True, "top_logprobs": 2}
    whole = gen.generate(CHAT_PROMPT, **options)
    whole.read()
    stream = gen.generate(CHAT_PROMPT, **options)
    first = next(stream)
    events = stream.events()
    assert events.stream is stream
    rest = list(events)
    assert first + "".join(e.text for e in rest) == "".join(gen.generate(CHAT_PROMPT, **options))
    seen = len(stream.token_ids) - sum(len(e.token_ids) for e in rest)
    assert stream.token_ids == whole.token_ids and seen >= 1
    assert [t for e in rest for t in e.token_ids] == whole.token_ids[seen:]
    assert stream.logprobs is not None and len(stream.logprobs) == 10


def test_async_events(gen: Phi3Generator) -> None:
    options = {"max_tokens": 10, "seed": 9, "logprobs": True, "top_logprobs": 5, **SAMPLING}
    text = "".join(gen.generate(CHAT_PROMPT, **options))

    async def collect() -> tuple[TokenStream, list[TokenEvent]]:
        stream = gen.generate(CHAT_PROMPT, **options)
        return stream, [event async for event in stream.events()]

    stream, events = asyncio.run(collect())
    check_events(events, stream, text)
    assert stream.logprobs is not None
    check_entries(stream.logprobs, stream.token_ids, reference(gen, stream), 5)
