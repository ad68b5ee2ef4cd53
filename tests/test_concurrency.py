"""The GIL is released while the model works; streams are independent; Ctrl-C is prompt."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


# Run in a child process, so that a signal landing late (after the prompt) cannot interrupt
# pytest itself: the child reports what it saw as one JSON line.
LONG_PROMPT_CHILD = """
import _thread, json, signal, sys, threading
from candle_phi import Phi3Generator

signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
model, tokenizer, prompt, short_prompt = sys.argv[1:5]
gen = Phi3Generator(model, tokenizer=tokenizer, prefix_cache_bytes=0)
stream = gen.generate(prompt, max_tokens=5, temperature=0)
finished = threading.Event()
sent = threading.Event()

def interrupt_once_the_prompt_runs():
    # Stats are read without waiting for the step under way: this sees the first chunk in
    # while the next ones are computed.
    while stream.prompt_tokens_per_second is None:
        if finished.wait(0.001):
            return
    sent.set()
    _thread.interrupt_main()

helper = threading.Thread(target=interrupt_once_the_prompt_runs)
helper.start()
outcome = "no interrupt"
try:
    for _ in stream:
        pass
except KeyboardInterrupt:
    outcome = "interrupted"
finished.set()
helper.join()
report = {
    "outcome": outcome,
    "sent": sent.is_set(),
    "time_to_first_token": stream.time_to_first_token,
    "generated_tokens": stream.generated_tokens,
}
# The generator is still usable: a new stream generates.
again = gen.generate(short_prompt, max_tokens=3, ignore_eos=True, seed=1)
again.read()
report["again"] = [again.generated_tokens, again.finish_reason]
print(json.dumps(report))
"""


def test_ctrl_c_during_a_long_prompt(slow_model_path: Path, tokenizer_path: Path) -> None:
    """Ctrl-C while the prompt is being processed stops it before its end (no wall clock:
    the signal is sent once a first prompt chunk is in, and the prompt has ~60 more)."""
    args = [str(slow_model_path), str(tokenizer_path), LONGEST_PROMPT, CHAT_PROMPT]
    result = subprocess.run(
        [sys.executable, "-c", LONG_PROMPT_CHILD, *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["sent"], report
    assert report["outcome"] == "interrupted", f"the prompt finished before the signal: {report}"
    assert report["time_to_first_token"] is None, report
    assert report["generated_tokens"] == 0, report
    assert report["again"] == [3, "length"], report
