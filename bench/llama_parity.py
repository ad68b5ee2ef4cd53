"""Parity with llama.cpp (llama-cpp-python) on the same GGUF files: an opt-in check.

    pip install llama-cpp-python   # built from source with native CPU flags
    python bench/llama_parity.py [--tokens 96] [--types F32 Q8_0 Q4_K ...]

For each tensor type it writes a tiny phi3 GGUF (tests/fixtures), feeds the same token ids to
candle-phi and to llama.cpp (teacher forcing: every position sees the true prefix), and
prints the greedy top-1 agreement and the largest logit difference, next to the same figures
against the independent NumPy reference. llama.cpp and Candle both quantize activations for
quantized matmuls and llama.cpp keeps its KV cache in f16, so small differences are
arithmetic; a layout error would show as agreement near chance (1/32064).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests" / "fixtures"), str(HERE.parent / "tests" / "reference")]

import phi3_fixtures as fx  # noqa: E402
from candle_phi import Phi3Generator  # noqa: E402
from phi3_reference import reference_logits  # noqa: E402

TYPES = ["F32", "F16", "Q8_0", "Q5_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
CONFIGS = {
    "gqa": fx.TinyPhi3Config(
        hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, context_length=256
    ),
    "longrope+tied+partial": fx.TinyPhi3Config(
        hidden_size=256,
        intermediate_size=512,
        num_heads=4,
        num_kv_heads=2,
        context_length=256,
        rope_dim=48,
        tied_embeddings=True,
        original_context_length=64,
        rope_factors=True,
        # Written by llama.cpp's converter for every LongRoPE model. Without the key llama.cpp
        # applies no attention factor, while candle-phi derives it as Hugging Face does
        # (sqrt(1 + ln(256/64) / ln(64)) here): logits then differ by up to ~10.
        rope_attn_factor=1.1547,
    ),
}


def llama_logits(path: Path, ids: list[int], n_ctx: int) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=n_ctx, logits_all=True, n_threads=2, verbose=False)
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], dtype=np.float64)


def row(label: str, ours: np.ndarray, other: np.ndarray) -> str:
    agree = float(np.mean(ours.argmax(-1) == other.argmax(-1)))
    diff = float(np.abs(ours - other).max())
    return f"{label:>10}: top-1 agreement {agree:6.1%}  max |logit diff| {diff:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--types", nargs="+", default=TYPES)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / "tokenizer.json"
        fx.write_tokenizer_json(tokenizer)
        ids = [int(t) for t in np.random.default_rng(0).integers(0, 32000, args.tokens)]
        for config_name, config in CONFIGS.items():
            for weight_type in args.types:
                path = Path(tmp) / f"{config_name}-{weight_type}.gguf"
                fx.write_phi3_gguf(path, config, seed=7, weight_type=weight_type)
                gen = Phi3Generator(path, tokenizer=tokenizer)
                # With more tokens than the original context (64), LongRoPE's long factors are
                # in use on all three sides: llama.cpp picks them from n_ctx, candle-phi and
                # the reference from the sequence length.
                ours = np.asarray(gen.logits(ids), dtype=np.float64)
                print(f"{config_name} {weight_type} ({len(ids)} tokens)")
                print(row("numpy", ours, reference_logits(path, ids)))
                print(row("llama.cpp", ours, llama_logits(path, ids, config.context_length)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
