"""Session fixtures: tiny but complete Phi-3 GGUF files and a Phi-3-style tokenizer.json,
written once per test run into a temporary directory (never into git)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
sys.path.insert(0, str(Path(__file__).parent / "server"))
import phi3_fixtures as fx
from candle_phi import Phi3Generator

pytest_plugins = ["serving"]  # the server tests' fixtures, from tests/server/

END = fx.SPECIAL_TOKENS["<|end|>"]
ENDOFTEXT = fx.SPECIAL_TOKENS["<|endoftext|>"]
ASSISTANT = fx.SPECIAL_TOKENS["<|assistant|>"]
NEWLINE = 3 + ord("\n")  # the byte-fallback token <0x0A>: chat prompts end "<|assistant|>\n"

# A prompt in the Phi-3 chat format; it ends in <|assistant|>, the trigger of scripted models.
CHAT_PROMPT = "<|user|>\nWrite a haiku about ice hockey<|end|>\n<|assistant|>"

TINY_CONFIG = fx.TinyPhi3Config(context_length=1024)

# Larger than the others so that one prompt takes long enough to observe threads and Ctrl-C.
SLOW_CONFIG = fx.TinyPhi3Config(
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    intermediate_size=1024,
    context_length=4096,
)


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("phi3")


@pytest.fixture(scope="session")
def tokenizer_path(fixture_dir: Path) -> Path:
    path = fixture_dir / "tokenizer.json"
    fx.write_tokenizer_json(path)
    return path


@pytest.fixture(scope="session")
def model_path(fixture_dir: Path) -> Path:
    path = fixture_dir / "tiny-phi3.gguf"
    fx.write_phi3_gguf(path, TINY_CONFIG, seed=1)
    return path


@pytest.fixture(scope="session")
def gqa_model_path(fixture_dir: Path) -> Path:
    path = fixture_dir / "tiny-phi3-gqa.gguf"
    fx.write_phi3_gguf(path, fx.TinyPhi3Config(num_kv_heads=2, context_length=1024), seed=2)
    return path


@pytest.fixture(scope="session")
def f32_generator(fixture_dir: Path, tokenizer_path: Path) -> Phi3Generator:
    path = fixture_dir / "tiny-phi3-f32.gguf"
    config = fx.TinyPhi3Config(num_kv_heads=2, context_length=1024)
    fx.write_phi3_gguf(path, config, seed=4, weight_type="F32")
    # An f32 cache too: exactness checks then see only the f32 summation order (an f16 cache
    # rounds keys and values, and a last-bit difference can round to the other neighbour).
    return Phi3Generator(path, tokenizer=tokenizer_path, kv_cache_type="f32")


@pytest.fixture(scope="session")
def generator(model_path: Path, tokenizer_path: Path) -> Phi3Generator:
    return Phi3Generator(model_path, tokenizer=tokenizer_path)


@pytest.fixture(scope="session")
def gqa_generator(gqa_model_path: Path, tokenizer_path: Path) -> Phi3Generator:
    return Phi3Generator(gqa_model_path, tokenizer=tokenizer_path)


@pytest.fixture(scope="session")
def slow_model_path(fixture_dir: Path) -> Path:
    path = fixture_dir / "slow-phi3.gguf"
    fx.write_phi3_gguf(path, SLOW_CONFIG, seed=3)
    return path


@pytest.fixture(scope="session")
def slow_generator(slow_model_path: Path, tokenizer_path: Path) -> Phi3Generator:
    # No prefix reuse: its tests need every prompt computed in full.
    return Phi3Generator(slow_model_path, tokenizer=tokenizer_path, prefix_cache_bytes=0)


@pytest.fixture(scope="session")
def scripted(fixture_dir: Path, tokenizer_path: Path) -> Callable[..., Phi3Generator]:
    """A generator whose greedy output after the trigger token (by default `<|assistant|>`,
    the end of CHAT_PROMPT) is exactly the given token ids."""
    cache: dict[tuple[int, ...], Phi3Generator] = {}

    def make(script: list[int], trigger: int = ASSISTANT) -> Phi3Generator:
        key = (trigger, *script)
        if key not in cache:
            path = fixture_dir / f"scripted-{len(cache)}.gguf"
            fx.write_phi3_gguf(path, TINY_CONFIG, script=script, trigger_token=trigger)
            cache[key] = Phi3Generator(path, tokenizer=tokenizer_path)
        return cache[key]

    return make


@pytest.fixture()
def token_id(generator: Phi3Generator) -> Callable[[str], int]:
    """The id of a single-token string in the fixture tokenizer."""

    def lookup(piece: str) -> int:
        found = generator.token_to_id(piece)
        assert found is not None, f"{piece!r} is not a token of the fixture tokenizer"
        return found

    return lookup


@pytest.fixture()
def clean_hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty HF cache and no way to reach a real hub (a closed local port as endpoint)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for var in ("HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    yield cache
