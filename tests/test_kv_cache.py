"""The KV cache's storage types: the option, its errors, and the memory each takes.

Accuracy against the float64 reference is in test_reference.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from candle_phi import InvalidArgumentError, Phi3Generator
from conftest import TINY_CONFIG


def test_default_is_f16_and_each_type_is_kept(model_path: Path, tokenizer_path: Path) -> None:
    assert Phi3Generator(model_path, tokenizer=tokenizer_path).kv_cache_type == "f16"
    for kind in ("f16", "q8_0", "f32"):
        gen = Phi3Generator(model_path, tokenizer=tokenizer_path, kv_cache_type=kind)
        assert gen.kv_cache_type == kind


@pytest.mark.parametrize("bad", ["f8", "F16", "", 16, None])
def test_bad_kv_cache_type(model_path: Path, tokenizer_path: Path, bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match="kv_cache_type") as err:
        Phi3Generator(model_path, tokenizer=tokenizer_path, kv_cache_type=bad)  # type: ignore[arg-type]
    if isinstance(bad, str):
        assert "'f16'" in str(err.value) and "'q8_0'" in str(err.value)


def test_bytes_per_token_follow_the_type(model_path: Path, tokenizer_path: Path) -> None:
    # An ended stream's state is kept whole: its bytes are the cache's allocation, the same
    # number of rows for each type, so they scale as 4 : 2 : 1.125 bytes a value (the 8-bit
    # rows hold one 4-byte scale per 32 values, or fewer: a partial block).
    states = {}
    for kind in ("f32", "f16", "q8_0"):
        gen = Phi3Generator(model_path, tokenizer=tokenizer_path, kv_cache_type=kind)
        gen.generate([1, 5, 9, 13], max_tokens=2, temperature=0).read()
        count, states[kind] = gen.prefix_cache_usage
        assert count == 1
    assert states["f32"] == 2 * states["f16"]
    head_dim = TINY_CONFIG.hidden_size // TINY_CONFIG.num_heads
    assert states["q8_0"] * 4 * head_dim == states["f32"] * (head_dim + 4)
