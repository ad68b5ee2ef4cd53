"""Continuous batching: streams of one generator stepped from several threads share forward
passes, and each still gets the tokens it gets alone."""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor

from candle_phi import Phi3Generator
from conftest import CHAT_PROMPT

PROMPTS = [CHAT_PROMPT, "Hello world", "Write a short poem about the ocean", "the ice"]


def run(gen: Phi3Generator, prompt: str, seed: int) -> tuple[list[int], str | None]:
    stream = gen.generate(prompt, max_tokens=24, temperature=0.9, seed=seed, ignore_eos=True)
    stream.read()
    return stream.token_ids, stream.finish_reason


def test_concurrent_streams_share_passes_and_keep_their_tokens(
    gqa_generator: Phi3Generator,
) -> None:
    jobs = [(PROMPTS[i % len(PROMPTS)], i) for i in range(8)]
    solo = [run(gqa_generator, p, s) for p, s in jobs]
    passes_before, steps_before = gqa_generator.pass_counts
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda job: run(gqa_generator, *job), jobs))
    passes, steps = gqa_generator.pass_counts
    assert together == solo
    # Each stream took 25 steps (its prompt, 23 fed tokens, one more sample); with four at a
    # time, steps outnumber passes once any two shared one.
    assert steps - steps_before == sum(len(ids) for ids, _ in solo)
    assert passes - passes_before < steps - steps_before, "no pass served two streams"


def test_greedy_streams_in_one_batch_equal_their_solo_runs(f32_generator: Phi3Generator) -> None:
    def greedy(prompt: str) -> list[int]:
        stream = f32_generator.generate(prompt, max_tokens=30, temperature=0, ignore_eos=True)
        stream.read()
        return stream.token_ids

    solo = [greedy(p) for p in PROMPTS]
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        assert list(pool.map(greedy, PROMPTS)) == solo


def test_active_streams_counts_streams_until_they_end(generator: Phi3Generator) -> None:
    base = generator.active_streams
    finished = generator.generate(CHAT_PROMPT, max_tokens=2)
    closed = generator.generate(CHAT_PROMPT, max_tokens=2)
    cancelled = generator.generate(CHAT_PROMPT, max_tokens=50, ignore_eos=True)
    dropped = generator.generate(CHAT_PROMPT, max_tokens=2)
    assert generator.active_streams == base + 4
    finished.read()
    assert generator.active_streams == base + 3
    closed.close()
    assert generator.active_streams == base + 2
    next(cancelled)
    cancelled.cancel()
    assert list(cancelled) == [] or cancelled.finish_reason == "cancelled"
    assert cancelled.finish_reason == "cancelled"
    assert generator.active_streams == base + 1
    del dropped
    gc.collect()
    assert generator.active_streams == base


def test_a_cancel_in_one_stream_leaves_the_others_running(
    gqa_generator: Phi3Generator,
) -> None:
    streams = [
        gqa_generator.generate(p, max_tokens=40, temperature=0, ignore_eos=True) for p in PROMPTS
    ]
    solo = []
    for p in PROMPTS:
        s = gqa_generator.generate(p, max_tokens=40, temperature=0, ignore_eos=True)
        s.read()
        solo.append(s.token_ids)
    first_piece = threading.Barrier(len(streams))

    def consume(index: int) -> list[int]:
        stream = streams[index]
        next(stream, None)
        first_piece.wait()
        if index == 0:
            stream.cancel()
        for _ in stream:
            pass
        return stream.token_ids

    with ThreadPoolExecutor(max_workers=len(streams)) as pool:
        got = list(pool.map(consume, range(len(streams))))
    assert streams[0].finish_reason == "cancelled"
    assert got[0] == solo[0][: len(got[0])]
    assert got[1:] == solo[1:]
