"""The GIL is released while the model works; streams are independent; Ctrl-C is prompt."""

from __future__ import annotations

import _thread
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from candle_phi import Phi3Generator
from conftest import CHAT_PROMPT

LONG_PROMPT = CHAT_PROMPT + " the" * 1500
# Nearly the slow model's whole context: ~63 chunks after the first, so that the signal
# lands long before the end however fast the CPU (or however late the helper thread runs).
LONGEST_PROMPT = CHAT_PROMPT + " the" * 4000


def test_other_threads_run_while_a_token_is_computed(slow_generator: Phi3Generator) -> None:
    # One call computes the whole prompt (many chunks) and the first token. Another thread
    # watches the stream meanwhile: with the GIL held for the whole call it could run only
    # after the call, when the token exists; with the GIL released it sees the prompt under
    # way and no token yet. No timing: the observation itself is the evidence.
    stream = slow_generator.generate(LONG_PROMPT, max_tokens=1, temperature=0)
    seen: dict[str, int] = {}

    def watch() -> None:
        while stream.prompt_tokens_per_second is None:  # the first chunk is not in yet
            pass
        seen["generated_tokens"] = stream.generated_tokens

    watcher = threading.Thread(target=watch)
    watcher.start()
    next(stream, None)  # the whole prompt plus one token, in Rust
    watcher.join()
    assert stream.generated_tokens == 1
    assert seen == {"generated_tokens": 0}, "the other thread ran only after the call"


def generate_text(gen: Phi3Generator, seed: int) -> str:
    return "".join(gen.generate(CHAT_PROMPT, max_tokens=30, temperature=1.0, seed=seed))


def test_interleaved_streams_match_solo_runs(generator: Phi3Generator) -> None:
    solo = [generate_text(generator, s) for s in (11, 12)]
    a = generator.generate(CHAT_PROMPT, max_tokens=30, temperature=1.0, seed=11)
    b = generator.generate(CHAT_PROMPT, max_tokens=30, temperature=1.0, seed=12)
    pieces: dict[int, list[str]] = {0: [], 1: []}
    live = {0: a, 1: b}
    while live:
        for key in list(live):
            piece = next(live[key], None)
            if piece is None:
                del live[key]
            else:
                pieces[key].append(piece)
    assert ["".join(pieces[0]), "".join(pieces[1])] == solo


def test_threads_share_one_generator(gqa_generator: Phi3Generator) -> None:
    seeds = list(range(6))
    solo = [generate_text(gqa_generator, s) for s in seeds]
    with ThreadPoolExecutor(max_workers=3) as pool:
        threaded = list(pool.map(lambda s: generate_text(gqa_generator, s), seeds))
    assert threaded == solo


@pytest.fixture()
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt during the test, whatever this process inherited.

    A background job of a non-interactive shell (`pytest &`) starts with SIGINT ignored, and
    then `_thread.interrupt_main()` does nothing at all.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_a_long_prompt(slow_generator: Phi3Generator, sigint_raises: None) -> None:
    """Ctrl-C while the prompt is being processed stops it before its end (no wall clock:
    the signal is sent once a first prompt chunk is in, and the prompt has many more)."""
    stream = slow_generator.generate(LONGEST_PROMPT, max_tokens=5, temperature=0)
    finished = threading.Event()

    def interrupt_once_the_prompt_runs() -> None:
        # prompt_tokens_per_second is set by the first prompt chunk.
        while stream.prompt_tokens_per_second is None:
            if finished.wait(0.001):
                return
        _thread.interrupt_main()

    helper = threading.Thread(target=interrupt_once_the_prompt_runs)
    helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in stream:
                pass
    finally:
        finished.set()
        helper.join()
    assert stream.time_to_first_token is None, "the prompt finished before the interrupt"
    assert stream.generated_tokens == 0
    # The generator is still usable: a new stream generates.
    again = slow_generator.generate(CHAT_PROMPT, max_tokens=3, ignore_eos=True, seed=1)
    again.read()
    assert again.generated_tokens == 3 and again.finish_reason == "length"
