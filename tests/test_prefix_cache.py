"""Prefix reuse: a prompt that starts with tokens an ended stream computed reads only the
rest, and gets the logits a fresh run gets (within the batched-vs-token-by-token tolerance)."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import phi3_fixtures as fx
import pytest
from candle_phi import GenerationOptions, Phi3Generator, TokenStream
from candle_phi.types import ChatMessage

BASE = fx.TinyPhi3Config(num_kv_heads=2, context_length=256)
# name: (config, weight type, logits tolerance: the existing chunking-invariance ones). F32
# weights run an f32 cache, where only summation order differs, except LongRoPE's, which runs
# the default f16 cache: a value computed in another chunking can round to the neighbouring
# f16 (2e-3, as in the engine's compact-cache test).
MODELS = {
    "f32": (BASE, "F32", 1e-4),
    "q8_0": (BASE, "Q8_0", 0.1),
    "sliding-window": (replace(BASE, sliding_window=24), "F32", 1e-4),
    "longrope": (replace(BASE, original_context_length=32, rope_factors=True), "F32", 2e-3),
}
KV_CACHE_TYPES = {"f32": "f32", "q8_0": "f16", "sliding-window": "f32", "longrope": "f16"}

CONVERSATION: list[ChatMessage] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour of the sea."},
    {"role": "assistant", "content": "Blue, mostly; grey in winter."},
    {"role": "user", "content": "And of the sky at dusk?"},
    {"role": "assistant", "content": "Orange, then violet."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.fixture(scope="module")
def model_files(fixture_dir: Path) -> dict[str, Path]:
    paths = {}
    for name, (config, weight_type, _) in MODELS.items():
        paths[name] = fixture_dir / f"prefix-{name}.gguf"
        fx.write_phi3_gguf(paths[name], config, seed=7, weight_type=weight_type)
    return paths


def log_softmax(row: list[float]) -> np.ndarray:
    x = np.asarray(row, dtype=np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def assert_first_token_matches(stream: TokenStream, reference_row: list[float], tol: float):
    """The stream's first token's reported log-probabilities equal the reference's."""
    assert stream.logprobs
    first = stream.logprobs[0]
    expected = log_softmax(reference_row)
    twentieth = np.sort(expected)[-20]
    for top in first.top_logprobs:
        assert abs(top.logprob - expected[top.token_id]) < 2 * tol
        assert expected[top.token_id] >= twentieth - 2 * tol  # one of the 20 most likely
    assert first.token_id == first.top_logprobs[0].token_id  # greedy


def conversation_ids(gen: Phi3Generator, n: int) -> list[int]:
    ids = gen.tokenize(gen.apply_chat_template(CONVERSATION), add_special_tokens=False)
    assert len(ids) >= n
    return ids[:n]


@pytest.mark.parametrize("name", MODELS)
def test_reuse_gives_fresh_logits_at_every_position(
    name: str, model_files: dict[str, Path], tokenizer_path: Path
) -> None:
    """Each prompt extends the last by one token: every position is computed on top of a
    reused state, and its logits equal those of one fresh pass over the whole sequence."""
    config, _, tol = MODELS[name]
    gen = Phi3Generator(
        model_files[name], tokenizer=tokenizer_path, kv_cache_type=KV_CACHE_TYPES[name]
    )
    ids = conversation_ids(gen, 60)
    original = config.original_context_length
    # A sequence's LongRoPE factors depend on its whole span (prompt + max_tokens): the
    # reference uses the same ones as each stream.
    long_reference = gen.logits(ids)
    short_reference = gen.logits(ids[:original]) if original else long_reference
    previous_span = 0
    for k in range(1, len(ids)):
        stream = gen.generate(
            ids[: k + 1], max_tokens=1, temperature=0, logprobs=True, top_logprobs=20
        )
        stream.read()
        span = k + 2
        same_factors = not original or (span > original) == (previous_span > original)
        assert stream.cached_tokens == (k if k > 1 and same_factors else 0), k
        reference = long_reference if original and span > original else short_reference
        assert_first_token_matches(stream, reference[k], tol)
        previous_span = span


@pytest.mark.parametrize("name", ["f32", "q8_0", "longrope"])
def test_a_diverging_prompt_reuses_the_shared_part(
    name: str, model_files: dict[str, Path], tokenizer_path: Path
) -> None:
    """A kept state serves any prompt sharing its head, whether the state moves to the new
    stream (mostly shared) or its head is copied (a small part shared): each generated
    token's log-probabilities equal a fresh run's over prompt plus generated tokens."""
    _, _, tol = MODELS[name]
    gen = Phi3Generator(
        model_files[name], tokenizer=tokenizer_path, kv_cache_type=KV_CACHE_TYPES[name]
    )
    ids = conversation_ids(gen, 60)
    # Long enough that every prompt spans past LongRoPE's original context, as the kept
    # state does: both rotate with the long factors.
    other = [int(t) for t in np.random.default_rng(3).integers(100, 30000, 30)]
    for k in (5, 20, 40, 59):
        gen.generate(ids, max_tokens=4, temperature=0).read()  # keeps ids + 3 replies
        prompt = ids[:k] + other
        stream = gen.generate(prompt, max_tokens=4, temperature=0, logprobs=True, top_logprobs=5)
        stream.read()
        assert stream.cached_tokens == k
        reference = gen.logits(prompt + stream.token_ids)
        for i, entry in enumerate(stream.logprobs or []):
            expected = log_softmax(reference[len(prompt) - 1 + i])
            assert abs(entry.logprob - expected[entry.token_id]) < 2 * tol
            assert entry.token_id == int(np.argmax(expected)) or (
                expected.max() - expected[entry.token_id] < 2 * tol
            )


def test_multi_turn_chat_reuses_its_history(model_files: dict[str, Path], tokenizer_path: Path):
    """Turn after turn, only the new tokens are computed, and each reply is the one a
    generator without reuse gives."""
    cached = Phi3Generator(model_files["f32"], tokenizer=tokenizer_path)
    fresh = Phi3Generator(model_files["f32"], tokenizer=tokenizer_path, prefix_cache_bytes=0)
    messages: list[ChatMessage] = [{"role": "system", "content": "You are terse."}]
    kept: list[int] = []
    for turn, question in enumerate(["Hi!", "What is ice?", "And snow?", "Bye."]):
        messages.append({"role": "user", "content": question})
        stream = cached.chat(messages, max_tokens=8, temperature=0)
        reply = stream.read()
        prompt = stream.prompt_token_ids
        shared = 0
        while shared < min(len(kept), len(prompt) - 1) and kept[shared] == prompt[shared]:
            shared += 1
        assert stream.cached_tokens == shared
        if turn:
            assert shared > 0.6 * len(prompt), "the history was not reused"
        baseline = fresh.chat(messages, max_tokens=8, temperature=0)
        assert baseline.read() == reply and baseline.cached_tokens == 0
        # The cache holds the prompt and every generated token but the last (never fed).
        kept = (
            prompt + stream.token_ids[:-1]
            if stream.finish_reason == "length"
            else prompt + stream.token_ids
        )
        messages.append({"role": "assistant", "content": reply})


def test_budget_zero_keeps_nothing_and_lru_evicts(
    model_files: dict[str, Path], tokenizer_path: Path
) -> None:
    off = Phi3Generator(model_files["f32"], tokenizer=tokenizer_path, prefix_cache_bytes=0)
    ids = conversation_ids(off, 40)
    for _ in range(2):
        assert off.generate(ids, max_tokens=2).read() is not None
        assert off.prefix_cache_usage == (0, 0)
    assert off.generate(ids, max_tokens=2).cached_tokens == 0

    gen = Phi3Generator(model_files["f32"], tokenizer=tokenizer_path)
    gen.generate(ids[:20], max_tokens=1).read()
    count, one_state = gen.prefix_cache_usage
    assert count == 1 and one_state > 0
    # Room for one state: a second, unrelated prompt evicts the first.
    small = Phi3Generator(
        model_files["f32"], tokenizer=tokenizer_path, prefix_cache_bytes=one_state
    )
    a, b = ids[:20], [7, *ids[1:20]]
    small.generate(a, max_tokens=1).read()
    small.generate(b, max_tokens=1).read()
    assert small.prefix_cache_usage == (1, one_state)
    assert small.generate([*a, 5], max_tokens=1).cached_tokens == 0
    # A state larger than the budget is not kept at all.
    tiny = Phi3Generator(
        model_files["f32"], tokenizer=tokenizer_path, prefix_cache_bytes=one_state - 1
    )
    tiny.generate(a, max_tokens=1).read()
    assert tiny.prefix_cache_usage == (0, 0)


def test_streams_started_together_never_share_a_cache(
    model_files: dict[str, Path], tokenizer_path: Path
) -> None:
    """Threads start streams with a common head at once, each continuing differently:
    every stream's tokens are those of a generator without reuse."""
    gen = Phi3Generator(model_files["f32"], tokenizer=tokenizer_path)
    fresh = Phi3Generator(model_files["f32"], tokenizer=tokenizer_path, prefix_cache_bytes=0)
    head = conversation_ids(gen, 40)
    gen.generate(head, max_tokens=1).read()
    prompts = [[*head[: 10 + 3 * i], 100 + i, 200 + i] for i in range(8)]
    expected = [fresh_tokens(fresh, p) for p in prompts]
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        barrier.wait()
        stream = gen.generate(prompts[i], max_tokens=6, temperature=0)
        for _ in stream:  # interleaved with the other threads' steps
            pass
        results[i] = stream.token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == expected


def fresh_tokens(gen: Phi3Generator, prompt: list[int]) -> list[int]:
    stream = gen.generate(prompt, max_tokens=6, temperature=0)
    stream.read()
    return stream.token_ids


def test_the_same_seed_gives_the_same_text_with_reuse(
    model_files: dict[str, Path], tokenizer_path: Path
) -> None:
    """Reused state gives logits that differ from a fresh run's in their last bits (the
    prompt is computed in other chunks); sampling must not turn that into other tokens."""
    cached = Phi3Generator(model_files["f32"], tokenizer=tokenizer_path)
    fresh = Phi3Generator(model_files["f32"], tokenizer=tokenizer_path, prefix_cache_bytes=0)
    prompt = conversation_ids(cached, 40)
    cached.generate(prompt[:-3], max_tokens=1).read()
    for seed in range(40):
        options: GenerationOptions = {"max_tokens": 12, "seed": seed, "temperature": 1.0}
        reused = cached.generate(prompt, **options)
        reused.read()
        assert reused.cached_tokens > 0
        alone = fresh.generate(prompt, **options)
        alone.read()
        assert reused.token_ids == alone.token_ids, seed
