"""`python -m candle_phi` in subprocesses: one-shot, piped stdin, the chat REPL, exit codes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from candle_phi import Phi3Generator
from conftest import END, NEWLINE

Scripted = Callable[..., Phi3Generator]


def cli(
    *args: str | Path, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "candle_phi", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture()
def hello(scripted: Scripted, token_id: Callable[[str], int]) -> list[str]:
    """Model flags for a model whose chat reply is "Hello world"."""
    gen = scripted([token_id("▁Hello"), token_id("▁world"), END], trigger=NEWLINE)
    return ["--model", str(gen.model_path), "--tokenizer", str(gen.tokenizer_path)]


def test_prompt_argument(hello: list[str]) -> None:
    result = cli(*hello, "Write a haiku", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello world\n"
    assert result.stderr == ""


def test_piped_stdin_and_flags(hello: list[str]) -> None:
    result = cli(*hello, "--max-tokens", "1", "--seed", "3", "--top-k", "none", stdin="Hi\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello\n"


def test_stop_flag_and_verbose(hello: list[str]) -> None:
    result = cli(*hello, "Hi", "--stop", " w", "--verbose", "--temperature", "0")
    assert result.returncode == 0
    assert result.stdout == "Hello\n"
    assert "tokens/s" in result.stderr and "stop" in result.stderr
    assert "(0 cached)" in result.stderr


def test_kv_cache_type_flag(hello: list[str]) -> None:
    result = cli(*hello, "Hi", "--verbose", "--temperature", "0")
    assert result.returncode == 0 and "f16 KV cache" in result.stderr  # the default
    result = cli(*hello, "Hi", "--verbose", "--temperature", "0", "--kv-cache-type", "q8_0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello world\n" and "q8_0 KV cache" in result.stderr
    bad = cli(*hello, "Hi", "--kv-cache-type", "f8")
    assert bad.returncode == 2 and "f16" in bad.stderr


def test_no_repack_weights_flag(hello: list[str]) -> None:
    result = cli(*hello, "Hi", "--temperature", "0", "--no-repack-weights")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello world\n"


def test_raw_prompt(generator: Phi3Generator) -> None:
    raw = "<|user|>\nHi<|end|>\n<|assistant|>"
    result = cli(
        "--model",
        generator.model_path,
        "--tokenizer",
        generator.tokenizer_path,
        "--raw",
        raw,
        "--max-tokens",
        "5",
        "--seed",
        "1",
    )
    expected = "".join(generator.generate(raw, max_tokens=5, seed=1))
    assert result.returncode == 0
    assert result.stdout == expected + "\n"


def test_chat_repl(hello: list[str]) -> None:
    session = (
        "\n".join(
            [
                "Hi there",
                "/set temperature 0",
                "/set top_k none",
                "/system Be brief.",
                '"""first line',
                'second line"""',
                "/set nonsense 1",
                "/set temperature hot",
                "/clear",
                "Again",
                "/exit",
                "never read",
            ]
        )
        + "\n"
    )
    result = cli(*hello, "--chat", stdin=session)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello world\n" * 3
    assert "unknown parameter 'nonsense'" in result.stderr
    assert "hot" in result.stderr


def test_sampling_flags_reach_the_engine(hello: list[str]) -> None:
    greedy = cli(*hello, "Hi", "--temperature", "0", "--min-p", "0.5", "--presence-penalty", "0.1")
    assert greedy.returncode == 0 and greedy.stdout == "Hello world\n"
    bad = cli(*hello, "Hi", "--frequency-penalty", "3")
    assert bad.returncode == 1 and "frequency_penalty" in bad.stderr


def test_chat_turns_reuse_the_history(hello: list[str]) -> None:
    """--verbose reports cached prompt tokens: the second turn reads only its new ones."""
    result = cli(*hello, "--chat", "--verbose", "--temperature", "0", stdin="Hi\nAnd again\n")
    assert result.returncode == 0, result.stderr
    cached = [int(n) for n in re.findall(r"\((\d+) cached\)", result.stderr)]
    prompts = [int(n) for n in re.findall(r"prompt (\d+) tokens", result.stderr)]
    assert len(cached) == 2 and cached[0] == 0
    assert prompts[1] > prompts[0] and cached[1] >= prompts[0]


def test_failed_turn_writes_nothing_to_stdout(hello: list[str]) -> None:
    # max_tokens past the context: ContextLengthError for that turn only.
    session = "/set max_tokens 100000\nHi\n/set max_tokens 20\nHi\n"
    result = cli(*hello, "--chat", "--temperature", "0", stdin=session)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello world\n"
    assert "context length" in result.stderr


def test_repl_ends_at_eof(hello: list[str]) -> None:
    result = cli(*hello, "--chat", stdin="Hi\n")
    assert result.returncode == 0
    assert result.stdout == "Hello world\n"


def test_errors_exit_1_with_one_line(tmp_path: Path, hello: list[str]) -> None:
    missing = cli("--model", tmp_path / "nope.gguf", "Hi", env={"HF_HUB_OFFLINE": "1"})
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "nope.gguf" in missing.stderr
    bad = cli(*hello, "Hi", "--temperature", "-1")
    assert bad.returncode == 1 and "temperature" in bad.stderr and bad.stdout == ""


def test_usage_errors_exit_2(hello: list[str]) -> None:
    assert cli(*hello, "Hi", "--temperature", "warm").returncode == 2
    assert cli("--no-such-flag").returncode == 2


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("candle-phi ")
