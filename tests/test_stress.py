"""Concurrency under stress: one generator, many threads, many streams; and threads that share
one stream, which must never crash the process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from candle_phi import ChatMessage, Phi3Generator, TokenStream
from conftest import CHAT_PROMPT

THREADS = 8
STREAMS_PER_THREAD = 4


def start(gen: Phi3Generator, seed: int) -> TokenStream:
    """A stream of its own per seed: prompts, lengths and entry points differ too."""
    params: dict[str, Any] = {"max_tokens": 4 + seed % 5, "temperature": 1.0, "seed": seed}
    if seed % 2:
        messages: list[ChatMessage] = [{"role": "user", "content": f"Tell story number {seed}."}]
        return gen.chat(messages, **params)
    return gen.generate(CHAT_PROMPT + " the" * (seed % 5), **params)


def test_threads_times_streams_match_solo_runs(generator: Phi3Generator) -> None:
    seeds = list(range(THREADS * STREAMS_PER_THREAD))
    solo = {seed: start(generator, seed).read() for seed in seeds}
    assert len(set(solo.values())) > len(seeds) // 2, "the seeds hardly matter: a weak test"
    everyone_ready = threading.Barrier(THREADS)

    def interleave(mine: list[int]) -> dict[int, str]:
        everyone_ready.wait()
        streams = {seed: start(generator, seed) for seed in mine}
        pieces: dict[int, list[str]] = {seed: [] for seed in mine}
        while streams:  # one step of each live stream in turn
            for seed, stream in list(streams.items()):
                piece = next(stream, None)
                if piece is None:
                    del streams[seed]
                else:
                    pieces[seed].append(piece)
        return {seed: "".join(p) for seed, p in pieces.items()}

    shares = [seeds[t::THREADS] for t in range(THREADS)]
    with ThreadPoolExecutor(THREADS) as pool:
        texts = {seed: text for part in pool.map(interleave, shares) for seed, text in part.items()}
    assert texts == solo


# Threads calling next() on one stream, getters read meanwhile: in a child process, so that a
# crash fails the test instead of ending pytest. It prints one JSON line per round.
SHARED_STREAM_CHILD = textwrap.dedent(
    """
    import json, sys, threading
    from candle_phi import CandlePhiError, Phi3Generator

    model, tokenizer, prompt, rounds, threads = sys.argv[1:]
    gen = Phi3Generator(model, tokenizer=tokenizer)
    for seed in range(int(rounds)):
        params = dict(max_tokens=16, temperature=1.0, seed=seed)
        solo = list(gen.generate(prompt, **params))
        stream = gen.generate(prompt, **params)
        n = int(threads)
        got = [[] for _ in range(n)]
        errors = []
        ready = threading.Barrier(n + 1)
        done = threading.Event()

        def pull(i):
            ready.wait()
            while True:
                try:
                    piece = next(stream)
                except StopIteration:
                    return
                except CandlePhiError as err:
                    errors.append(f"{type(err).__name__}: {err}")
                    return
                got[i].append(piece)

        def read_getters():
            ready.wait()
            while not done.is_set():
                try:
                    repr(stream), stream.generated_tokens, stream.token_ids
                    stream.finish_reason, stream.prompt_tokens, stream.time_to_first_token
                except CandlePhiError as err:
                    errors.append(f"{type(err).__name__}: {err}")

        pullers = [threading.Thread(target=pull, args=(i,)) for i in range(n)]
        reader = threading.Thread(target=read_getters)
        for t in [*pullers, reader]:
            t.start()
        for t in pullers:
            t.join()
        done.set()
        reader.join()
        print(json.dumps({"solo": solo, "got": got, "errors": errors}), flush=True)
    """
)


def interleaves(parts: list[list[str]], whole: list[str]) -> bool:
    """Whether `whole` is an interleaving of `parts`, each kept in its own order."""
    if sum(map(len, parts)) != len(whole):
        return False
    states = {tuple(0 for _ in parts)}
    for piece in whole:
        states = {
            (*state[:i], state[i] + 1, *state[i + 1 :])
            for state in states
            for i, part in enumerate(parts)
            if state[i] < len(part) and part[state[i]] == piece
        }
        if not states:
            return False
    return True


def test_threads_sharing_one_stream_never_crash(generator: Phi3Generator) -> None:
    """Two threads call next() on one stream while a third reads its getters: each call
    returns the next piece or raises a CandlePhiError; together the pieces are the solo
    text (its beginning, if an error stopped them), in order."""
    rounds = 8
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SHARED_STREAM_CHILD,
            str(generator.model_path),
            str(generator.tokenizer_path),
            CHAT_PROMPT,
            str(rounds),
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) == rounds
    for report in reports:
        got, solo = report["got"], report["solo"]
        taken = sum(map(len, got))
        assert interleaves(got, solo[:taken]), report
        if not report["errors"]:
            assert taken == len(solo), report
