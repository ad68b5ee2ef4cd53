"""Each bad argument raises its named exception, naming the parameter and the value."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from candle_phi import (
    CandlePhiError,
    ContextLengthError,
    InvalidArgumentError,
    ModelLoadError,
    Phi3Generator,
)
from conftest import CHAT_PROMPT

BAD_GENERATE_ARGS = [
    ("temperature", -0.5, "-0.5"),
    ("temperature", float("nan"), "NaN"),
    ("temperature", float("inf"), "inf"),
    ("temperature", "hot", "'hot'"),
    ("top_p", 0.0, "0"),
    ("top_p", 1.5, "1.5"),
    ("top_p", -1.0, "-1"),
    ("top_p", "all", "'all'"),
    ("top_k", 0, "0"),
    ("top_k", -3, "-3"),
    ("top_k", 2.5, "2.5"),
    ("repeat_penalty", 0.0, "0"),
    ("repeat_penalty", -1.0, "-1"),
    ("repeat_penalty", None, "None"),
    ("repeat_last_n", -1, "-1"),
    ("max_tokens", -1, "-1"),
    ("max_tokens", 1.5, "1.5"),
    ("max_tokens", "10", "'10'"),
    ("max_tokens", True, "True"),
    ("seed", -7, "-7"),
    ("seed", "abc", "'abc'"),
    ("stop_token_ids", [1, -2], "-2"),
    ("stop_token_ids", [10**9], "1000000000"),
    ("stop_token_ids", "32007", "'32007'"),
]


@pytest.mark.parametrize(("name", "value", "shown"), BAD_GENERATE_ARGS)
def test_bad_generate_argument(generator: Phi3Generator, name: str, value: Any, shown: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        generator.generate(CHAT_PROMPT, **{name: value})
    message = str(info.value)
    assert name in message and shown in message, message
    assert isinstance(info.value, ValueError) and isinstance(info.value, CandlePhiError)


def test_wrong_prompt_type(generator: Phi3Generator) -> None:
    with pytest.raises(InvalidArgumentError, match="prompt.*42"):
        generator.generate(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # also a TypeError, for code that expects one
        generator.generate(None)  # type: ignore[arg-type]


def test_unknown_keyword_is_a_type_error(generator: Phi3Generator) -> None:
    with pytest.raises(TypeError, match="tempreature"):
        generator.generate(CHAT_PROMPT, tempreature=1.0)  # type: ignore[call-arg]


def test_context_length_checked_before_compute(generator: Phi3Generator) -> None:
    n_prompt = len(generator.tokenize(CHAT_PROMPT))
    room = generator.context_length - n_prompt
    generator.generate(CHAT_PROMPT, max_tokens=room)  # fits exactly
    with pytest.raises(ContextLengthError, match=str(generator.context_length)) as info:
        generator.generate(CHAT_PROMPT, max_tokens=room + 1)
    assert str(n_prompt) in str(info.value)
    long_prompt = "the " * (generator.context_length + 10)
    with pytest.raises(ContextLengthError):
        generator.generate(long_prompt, max_tokens=None)


def test_max_tokens_none_fills_the_context(generator: Phi3Generator) -> None:
    n_prompt = len(generator.tokenize(CHAT_PROMPT))
    stream = generator.generate(CHAT_PROMPT, max_tokens=None, seed=5, stop_token_ids=None)
    list(stream)
    assert stream.generated_tokens <= generator.context_length - n_prompt


def test_bad_constructor_arguments(model_path: Any, tokenizer_path: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="model.*12"):
        Phi3Generator(12)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="tokenizer"):
        Phi3Generator(model_path, tokenizer=3.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="repo_id"):
        Phi3Generator(repo_id=None)  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError):
        Phi3Generator("")


def test_bad_token_ids(generator: Phi3Generator) -> None:
    with pytest.raises(InvalidArgumentError, match="token_ids.*-1"):
        generator.detokenize([5, -1])
    with pytest.raises(InvalidArgumentError, match="chunk_size"):
        generator.logits([1, 2], chunk_size=0)
    with pytest.raises(CandlePhiError, match="40000"):
        generator.logits([1, 40000])


def test_empty_prompt_still_has_bos(generator: Phi3Generator) -> None:
    stream = generator.generate("", max_tokens=2, seed=1)
    list(stream)
    assert stream.prompt_tokens == 1


def test_n_threads_is_process_wide(model_path: Any, tokenizer_path: Any) -> None:
    first = Phi3Generator(model_path, tokenizer=tokenizer_path)
    assert first.n_threads >= 1
    same = Phi3Generator(model_path, tokenizer=tokenizer_path, n_threads=first.n_threads)
    assert same.n_threads == first.n_threads
    with pytest.raises(InvalidArgumentError, match=f"already runs its models on {first.n_threads}"):
        Phi3Generator(model_path, tokenizer=tokenizer_path, n_threads=first.n_threads + 1)
    for bad in (0, -2, 1.5):
        with pytest.raises(InvalidArgumentError, match="n_threads"):
            Phi3Generator(model_path, tokenizer=tokenizer_path, n_threads=bad)  # type: ignore[arg-type]


def test_bad_prompt_token_ids(generator: Phi3Generator) -> None:
    with pytest.raises(InvalidArgumentError, match="prompt.*-5"):
        generator.generate([1, -5])
    with pytest.raises(InvalidArgumentError, match="prompt"):
        generator.generate([])


def test_n_threads_builds_the_pool_without_touching_the_environment(
    model_path: Any, tokenizer_path: Any
) -> None:
    # A fresh process: the pool is sized once per process.
    code = f"""
import os, pathlib
from candle_phi import Phi3Generator
gen = Phi3Generator({str(model_path)!r}, tokenizer={str(tokenizer_path)!r}, n_threads=3)
next(gen.generate("Hi", max_tokens=1, seed=0), None)
names = [p.read_text().strip() for p in pathlib.Path("/proc/self/task").glob("*/comm")]
print(gen.n_threads, sum(n.startswith("candle-phi-") and n[11:].isdigit() for n in names),
      "RAYON_NUM_THREADS" in os.environ, "CANDLE_NUM_THREADS" in os.environ)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS",)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    threads, workers, rayon_env, candle_env = out.stdout.split()
    assert threads == "3"
    if sys.platform == "linux":
        assert workers == "3"  # the pool in use is the one reported
    assert (rayon_env, candle_env) == ("False", "False")
