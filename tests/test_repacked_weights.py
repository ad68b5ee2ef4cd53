"""K-quant and Q4_0 weights repacked eight rows to a block at load (`repack_weights`, the
default): the same tokens and log-probabilities as the file's layout, in the memory the file
took."""

from __future__ import annotations

import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import phi3_fixtures as fx
import pytest
from candle_phi import InvalidArgumentError, Phi3Generator

# K-quant matrices need in_features of whole 256-value blocks.
KQUANT_CONFIG = fx.TinyPhi3Config(
    hidden_size=256, num_heads=4, num_kv_heads=4, intermediate_size=512, context_length=512
)
# Each repacked type in some matrices; the output (32064 rows: whole groups of eight) too.
TENSOR_TYPES = {
    "blk.0.attn_qkv.weight": "Q5_K",
    "blk.1.ffn_down.weight": "Q6_K",
    "blk.1.ffn_up.weight": "Q4_0",
}

# Our x86 kernels repack; elsewhere every matrix reads the file.
REPACKS = platform.machine() in ("x86_64", "AMD64")


@pytest.fixture(scope="module")
def kquant_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repacked") / "kquant.gguf"
    fx.write_phi3_gguf(path, KQUANT_CONFIG, seed=8, weight_type="Q4_K", tensor_types=TENSOR_TYPES)
    return path


def test_repacked_and_file_layout_agree(kquant_model: Path, tokenizer_path: Path) -> None:
    def run(repack: bool) -> tuple[str, list[list[float]], list[int]]:
        gen = Phi3Generator(kquant_model, tokenizer=tokenizer_path, repack_weights=repack)
        # Prompts of several tiles of activation rows and of one to a few, then decoding.
        prompt = list(range(100, 230))
        logits = gen.logits(prompt, chunk_size=70) + gen.logits(prompt[:5], chunk_size=1)
        stream = gen.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True)
        stream.read()
        return gen.kernels, logits, stream.token_ids

    repacked_kernels, repacked_logits, repacked_ids = run(True)
    file_kernels, file_logits, file_ids = run(False)
    # Every kernel gives each row the same bits either way.
    assert repacked_logits == file_logits
    assert len(repacked_ids) == 12 and repacked_ids == file_ids
    assert "repacked" not in file_kernels
    if REPACKS:
        assert "; repacked by 8 rows" in repacked_kernels


def test_streams_batched_on_repacked_weights(kquant_model: Path, tokenizer_path: Path) -> None:
    gen = Phi3Generator(kquant_model, tokenizer=tokenizer_path, prefix_cache_bytes=0)
    prompts = [[200 + 7 * i + k for k in range(9 + i)] for i in range(6)]

    def greedy(prompt: list[int]) -> list[int]:
        stream = gen.generate(prompt, max_tokens=10, temperature=0, ignore_eos=True)
        stream.read()
        return stream.token_ids

    alone = [greedy(p) for p in prompts]
    # Iterated from six threads, the streams step in shared passes: one to six rows.
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(greedy, prompts))
    assert together == alone


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_repack_weights(model_path: Path, tokenizer_path: Path, bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match="repack_weights"):
        Phi3Generator(model_path, tokenizer=tokenizer_path, repack_weights=bad)  # type: ignore[arg-type]


@pytest.mark.skipif(not REPACKS, reason="only the x86 kernels repack")
def test_memory_stays_at_the_file_size(tmp_path: Path, tokenizer_path: Path) -> None:
    # Large enough (about 40 MB of K-quants) that the process's own memory is noise.
    config = fx.TinyPhi3Config(
        hidden_size=1024, num_heads=8, num_kv_heads=8, intermediate_size=4096, num_layers=4
    )
    path = tmp_path / "kquant-40mb.gguf"
    fx.write_phi3_gguf(path, config, seed=9, weight_type="Q4_K", tensor_types=TENSOR_TYPES)
    probe = (
        "import sys\n"
        "from candle_phi import Phi3Generator\n"
        "g = Phi3Generator(sys.argv[1], tokenizer=sys.argv[2], repack_weights=sys.argv[3] == '1')\n"
        "g.generate([5, 6, 7], max_tokens=2, temperature=0).read()\n"
        "rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0]\n"
        "print(int(rss.split()[1]) * 1024, g.kernels)\n"
    )

    def rss(repack: bool) -> tuple[int, str]:
        args = [sys.executable, "-c", probe, str(path), str(tokenizer_path), str(int(repack))]
        out = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True)
        value, kernels = out.stdout.split(" ", 1)
        return int(value), kernels

    file_rss, _ = rss(False)
    repacked_rss, kernels = rss(True)
    assert "repacked" in kernels
    repacked_mib = float(kernels.split("(")[1].split(" MiB")[0])
    size = path.stat().st_size
    assert repacked_mib * 2**20 > 0.5 * size, kernels
    # The copy takes the file pages' place: not their size again.
    assert repacked_rss < file_rss + 0.1 * size, (repacked_rss, file_rss, size)
