"""Our logits against an independent NumPy implementation of the Phi-3 architecture.

`tests/reference/phi3_reference.py` shares no code with the engine: it reads the GGUF with the
`gguf` package (its own parser and dequantizers) and computes in float64. Every position of
every sequence is compared.

Tolerances, from the arithmetic: F32/F16/BF16 weights are used as f32 by both sides, so only
f32 rounding differs (1e-3 on logits of magnitude ~3). These checks run an f32 KV cache; the
compact caches (f16, the default, and 8-bit) are checked at the end, against the reference
with and without their rounding of keys and values. Quantized weights are identical on both
sides, but Candle's quantized matmuls also quantize each activation row (to Q8_0 blocks for the
legacy types, Q8_K super-blocks for K-quants), which the float reference does not: errors of
that size, a few percent of the logits' spread, are expected and bounded below.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import phi3_fixtures as fx
import pytest
from candle_phi import Phi3Generator

sys.path.insert(0, str(Path(__file__).parent / "reference"))
from phi3_reference import reference_logits

BASE = fx.TinyPhi3Config(context_length=128)
# Shapes that K-quants accept (rows of 256), shared by the per-type comparisons.
WIDE = fx.TinyPhi3Config(
    hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, context_length=64
)

# Scaled-down members of the family: the structural features of each published config.
FAMILY = {
    "phi3-mini-4k": replace(BASE, sliding_window=48),
    "phi3-mini-128k / phi3.5-mini": replace(
        BASE, original_context_length=32, rope_factors=True, sliding_window=100
    ),
    "phi3-medium": replace(BASE, num_heads=8, num_kv_heads=2, hidden_size=128),
    "phi4-mini": fx.TinyPhi3Config(
        hidden_size=192,
        num_heads=6,
        num_kv_heads=2,
        intermediate_size=128,
        context_length=128,
        rope_dim=24,
        tied_embeddings=True,
        original_context_length=32,
        rope_factors=True,
    ),
    "phi4": replace(BASE, num_heads=8, num_kv_heads=2, hidden_size=128, rope_freq_base=250000.0),
}


def token_ids(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 32000, n)]


def compare(gen: Phi3Generator, ids: list[int], **chunking: int) -> tuple[float, float, float]:
    """(max |ours - reference|, spread of the reference logits, top-1 agreement)."""
    ours = np.asarray(gen.logits(ids, **chunking), dtype=np.float64)
    ref = reference_logits(gen.model_path, ids)
    assert ours.shape == ref.shape
    agreement = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    return float(np.abs(ours - ref).max()), float(ref.std()), agreement


@pytest.fixture(scope="module")
def make(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path):
    out = tmp_path_factory.mktemp("reference")

    def build(
        config: fx.TinyPhi3Config,
        weight_type: str = "F32",
        seed: int = 5,
        kv_cache_type: str = "f32",
    ) -> Phi3Generator:
        path = out / f"m{len(list(out.iterdir()))}.gguf"
        fx.write_phi3_gguf(path, config, seed=seed, weight_type=weight_type)
        return Phi3Generator(path, tokenizer=tokenizer_path, kv_cache_type=kv_cache_type)

    return build


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_member_matches_reference(name: str, make) -> None:  # type: ignore[no-untyped-def]
    gen = make(FAMILY[name])
    for n in (17, gen.context_length):  # a short sequence, and the whole context window
        diff, _, agreement = compare(gen, token_ids(n))
        assert diff < 1e-3, f"{name}, {n} tokens: max logit difference {diff}"
        assert agreement == 1.0


def test_chunked_prompt_matches_reference_at_every_position(make) -> None:  # type: ignore[no-untyped-def]
    gen = make(replace(BASE, num_kv_heads=2, sliding_window=20))
    for chunk in (1, 9, 64):
        diff, _, _ = compare(gen, token_ids(100, seed=1), chunk_size=chunk)
        assert diff < 1e-3, f"chunk {chunk}: {diff}"


@pytest.mark.parametrize("attn_factor", [None, 1.3])
def test_long_rope_short_and_long_factors(make, attn_factor: float | None) -> None:  # type: ignore[no-untyped-def]
    config = replace(
        BASE, original_context_length=32, rope_factors=True, rope_attn_factor=attn_factor
    )
    gen = make(config)
    short = compare(gen, token_ids(30))  # within the original context: short factors
    long = compare(gen, token_ids(128))  # past it, to the last position: long factors
    for diff, _, _ in (short, long):
        assert diff < 1e-3
    # The factors matter: the same first 30 tokens give other logits in a long sequence.
    ours_long = np.asarray(gen.logits(token_ids(128)))[:30]
    ours_short = np.asarray(gen.logits(token_ids(30)))
    assert np.abs(ours_long[1:] - ours_short[1:]).max() > 1e-2


QUANTIZED = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]


@pytest.mark.parametrize("weight_type", ["F16", "BF16"])
def test_float_types_match_reference(weight_type: str, make) -> None:  # type: ignore[no-untyped-def]
    diff, spread, agreement = compare(make(WIDE, weight_type), token_ids(64, seed=2))
    assert diff / spread < 1e-4 and agreement == 1.0


@pytest.mark.parametrize("weight_type", QUANTIZED)
def test_quantized_types_match_reference(weight_type: str, make) -> None:  # type: ignore[no-untyped-def]
    # Only activation quantization separates us from the float reference here (the next test
    # shows the weights are bit-exact). Measured on these fixtures: max |diff| / spread
    # 0.08-0.19, rms / spread 0.015-0.023, top-1 agreement 95-98%.
    gen = make(WIDE, weight_type)
    ids = token_ids(64, seed=2)
    ours = np.asarray(gen.logits(ids), dtype=np.float64)
    ref = reference_logits(gen.model_path, ids)
    spread = ref.std()
    error = np.abs(ours - ref)
    assert error.max() / spread < 0.25, error.max()
    assert np.sqrt((error**2).mean()) / spread < 0.035
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.9
    # Every type runs on our kernels: none is named as left to Candle's.
    assert "candle" not in gen.kernels, gen.kernels


EXACT_CHECK = """
import sys, numpy as np
sys.path[:0] = sys.argv[1:3]
from phi3_reference import reference_logits
from candle_phi import Phi3Generator
gen = Phi3Generator(sys.argv[3], tokenizer=sys.argv[4], kv_cache_type="f32")
ids = [int(t) for t in np.random.default_rng(2).integers(0, 32000, 64)]
print(np.abs(np.asarray(gen.logits(ids)) - reference_logits(sys.argv[3], ids)).max())
"""


def test_quantized_weights_are_read_exactly(make, tokenizer_path: Path) -> None:  # type: ignore[no-untyped-def]
    # CANDLE_DEQUANTIZE_ALL makes Candle multiply with its dequantized weights in f32, taking
    # activation quantization out: what remains is how each side reads the blocks.
    for weight_type in QUANTIZED:
        gen = make(WIDE, weight_type)
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                EXACT_CHECK,
                str(Path(__file__).parent / "reference"),
                str(Path(__file__).parent / "fixtures"),
                str(gen.model_path),
                str(tokenizer_path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "CANDLE_DEQUANTIZE_ALL": "1"},
        )
        assert result.returncode == 0, result.stderr
        assert float(result.stdout) < 1e-4, f"{weight_type}: {result.stdout}"


def test_f16_cache_matches_reference_at_every_position(make) -> None:  # type: ignore[no-untyped-def]
    # The default cache rounds each key and value to f16 (as llama.cpp's does). Against the
    # reference that rounds them the same way only f32 arithmetic differs, though a value
    # computed in f32 can round to the neighbouring f16: measured 1e-4-5e-4 of the spread.
    # Against the exact reference the rounding itself shows: 1.8e-3-2.5e-3 of the spread.
    for name, config in FAMILY.items():
        gen = make(config, kv_cache_type="f16")
        assert gen.kv_cache_type == "f16"
        ids = token_ids(gen.context_length)  # to the end of the context
        ours = np.asarray(gen.logits(ids), dtype=np.float64)
        rounded = reference_logits(gen.model_path, ids, kv_cache="f16")
        exact = reference_logits(gen.model_path, ids)
        spread = exact.std()
        assert np.abs(ours - rounded).max() / spread < 1e-3, name
        assert np.abs(ours - exact).max() / spread < 5e-3, name
        assert np.array_equal(ours.argmax(-1), exact.argmax(-1)), name


def test_8bit_cache_error_is_bounded(make) -> None:  # type: ignore[no-untyped-def]
    # Blocks of 32 values in 8 bits: measured max |diff| 4-7% of the spread, rms 0.5-0.7%,
    # top-1 agreement 96.9-100% per member (98.1% over all 640 positions). With the same
    # rounding in the reference, only f32 arithmetic differs, and an occasional value that
    # rounds to the neighbouring step (up to 2e-3 of the spread).
    agree, positions = 0, 0
    for name, config in FAMILY.items():
        gen = make(config, kv_cache_type="q8_0")
        ids = token_ids(gen.context_length)
        ours = np.asarray(gen.logits(ids), dtype=np.float64)
        exact = reference_logits(gen.model_path, ids)
        rounded = reference_logits(gen.model_path, ids, kv_cache="q8_0")
        spread = exact.std()
        error = np.abs(ours - exact)
        assert error.max() / spread < 0.1, name
        assert np.sqrt((error**2).mean()) / spread < 0.01, name
        assert np.abs(ours - rounded).max() / spread < 5e-3, name
        top1 = ours.argmax(-1) == exact.argmax(-1)
        assert top1.mean() >= 0.95, name
        agree, positions = agree + int(top1.sum()), positions + len(ids)
    assert agree / positions >= 0.97
