"""`cancel()` from any thread ends a stream within one prompt chunk or one token; `close()`
and `with` free its state at once; a cancelled stream's prefix stays reusable."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from candle_phi import Phi3Generator
from conftest import CHAT_PROMPT

LONG_PROMPT = CHAT_PROMPT + " the" * 1500
CHUNK = 64  # prompt tokens per forward pass (generation.rs PREFILL_CHUNK)


@pytest.fixture(scope="module")
def slow_cached(slow_generator: Phi3Generator, tokenizer_path: Path) -> Phi3Generator:
    """The slow model with prefix reuse on (the shared fixture has it off)."""
    return Phi3Generator(slow_generator.model_path, tokenizer=tokenizer_path)


def test_cancel_from_another_thread_stops_a_long_prompt(slow_cached: Phi3Generator) -> None:
    # Without the cancel this would fill the whole context: minutes.
    stream = slow_cached.generate(LONG_PROMPT, max_tokens=None, ignore_eos=True, temperature=0)
    seen: dict[str, int] = {}

    def cancel_once_the_prompt_runs() -> None:
        while stream.prompt_tokens_per_second is None:  # set by the first prompt chunk
            pass
        seen["generated"] = stream.generated_tokens
        stream.cancel()

    canceller = threading.Thread(target=cancel_once_the_prompt_runs)
    canceller.start()
    stream.read()  # ends: the cancel stops the work in progress, no exception
    canceller.join()
    assert stream.finish_reason == "cancelled"
    # At most the step under way when cancel() came (a chunk, or one token) completes.
    assert stream.generated_tokens <= seen["generated"] + 1
    # What was computed before the cancel is kept: whole chunks, the first one at least.
    again = slow_cached.generate(LONG_PROMPT, max_tokens=0)
    prompt_tokens = again.prompt_tokens
    assert again.cached_tokens >= CHUNK
    assert again.cached_tokens % CHUNK == 0 or again.cached_tokens == prompt_tokens - 1
    again.close()


def test_cancel_before_and_during_iteration(generator: Phi3Generator) -> None:
    stream = generator.generate(CHAT_PROMPT, max_tokens=50, ignore_eos=True)
    stream.cancel()
    assert list(stream) == [] and stream.generated_tokens == 0
    assert stream.finish_reason == "cancelled"

    stream = generator.generate(CHAT_PROMPT, max_tokens=50, ignore_eos=True, seed=1)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) == 3:
            stream.cancel()
            generated = stream.generated_tokens
    assert len(pieces) <= 4  # held-back text may come out as the stream ends
    assert stream.generated_tokens == generated
    assert stream.finish_reason == "cancelled"
    stream.cancel()  # harmless once ended
    assert next(stream, None) is None


def test_cancel_after_the_end_changes_nothing(generator: Phi3Generator) -> None:
    stream = generator.generate(CHAT_PROMPT, max_tokens=3, ignore_eos=True)
    stream.read()
    stream.cancel()
    stream.close()
    assert stream.finish_reason == "length"


def test_close_and_with_hand_the_state_on_at_once(model_path: Path, tokenizer_path: Path) -> None:
    gen = Phi3Generator(model_path, tokenizer=tokenizer_path)
    with gen.generate(CHAT_PROMPT, max_tokens=40, ignore_eos=True) as stream:
        next(stream)
        assert gen.prefix_cache_usage[0] == 0  # the running stream holds its state
    # Closed on exit: ended, its state moved out of the stream into the generator's cache.
    assert stream.finish_reason == "cancelled"
    assert gen.prefix_cache_usage[0] == 1
    assert next(stream, None) is None
    reused = gen.generate(CHAT_PROMPT + " more", max_tokens=1)
    assert reused.cached_tokens == stream.prompt_tokens  # the prompt, reused
    reused.close()

    off = Phi3Generator(model_path, tokenizer=tokenizer_path, prefix_cache_bytes=0)
    stream = off.generate(CHAT_PROMPT, max_tokens=40)
    next(stream)
    stream.close()
    assert stream.finish_reason == "cancelled" and off.prefix_cache_usage == (0, 0)
    assert stream.token_ids  # stats stay readable after close


def test_close_from_another_thread_waits_for_the_step(slow_generator: Phi3Generator) -> None:
    stream = slow_generator.generate(LONG_PROMPT, max_tokens=None, ignore_eos=True)
    done = threading.Event()

    def consume() -> None:
        stream.read()
        done.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    while stream.prompt_tokens_per_second is None:
        pass
    stream.close()  # returns once the step under way has stopped
    consumer.join()
    assert done.is_set() and stream.finish_reason == "cancelled"
