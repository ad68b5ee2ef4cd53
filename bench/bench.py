"""candle-phi against llama.cpp (llama-cpp-python) on the same GGUF, in the same run.

    pip install llama-cpp-python          # from source: native CPU flags
    python bench/bench.py                 # 5 runs, 2 threads; writes bench/.out/
    python bench/bench.py --runs 7 --threads 2 --rust-loop
    python bench/bench.py --weights f16 --layers 8 --kernels avx2,candle   # other files
    python bench/bench.py --prompts 128,512 --long-context 0 --runs 3      # the short cases
    python bench/bench.py --shape mini-128k --prompts "" --long-context 16384 --layers 8
    CANDLE_PHI_KERNELS=avx2 python bench/bench.py --layers 8 --llama-lib /tmp/avx2-build/bin

The model has Phi-3-mini-4k-instruct's exact shapes (vocab 32064, hidden 3072, 32 layers, 32
heads, feed-forward 8192, context 4096) and the tensor-type mix of llama.cpp's Q4_K_M, as in
the published q4 file, with random weights (built once, deterministically, ~2.2 GB), or all
matrices in one type (``--weights f16|bf16|q8_0|q5_1|q5_0|q4_1|q4_0|q3_k|q2_k``; ``--layers`` fewer
than 32 for a file whose f32 source fits in memory: an F16 file is built from 4 bytes a
weight). Prompts of each ``--prompts`` size, decode after a 16-token prompt, and after a
``--long-context`` prompt (4,000 tokens: its own prompt figure too). ``--shape mini-128k``
is Phi-3-mini-128k-instruct's: the same matrices, a 131,072-token context and LongRoPE (its
long and short rotary factors past the original 4,096 tokens), for the 16k-token case. Each
engine runs in a fresh subprocess per run (cold load, its own peak RSS, which counts only
the engine and Python: the workers import no NumPy, 16 MiB of it, unless the engine does, as
llama-cpp-python does); runs alternate between the engines. Figures: median (min-max) over
the runs, and candle-phi / llama.cpp. Decode ignores end tokens. This is not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / ".out"
sys.path.insert(0, str(HERE.parent / "tests" / "fixtures"))

PHI3_MINI = {
    "hidden_size": 3072,
    "num_layers": 32,
    "num_heads": 32,
    "num_kv_heads": 32,
    "intermediate_size": 8192,
    "context_length": 4096,
}
# Phi-3-mini-128k-instruct: the same matrices, LongRoPE factors past 4,096 tokens.
SHAPES: dict[str, dict[str, Any]] = {
    "mini-4k": {},
    "mini-128k": {
        "context_length": 131072,
        "original_context_length": 4096,
        "rope_factors": True,
    },
}
PROMPT_SIZES = "128,512,2048"
LONG_CONTEXT = 4000
SHORT_PROMPT = 16
DECODE_TOKENS = 64


def q4_k_m_types(num_layers: int) -> dict[str, str]:
    """llama.cpp's Q4_K_M choices for a phi3 model (fused QKV, fused gate/up)."""
    types = {"output.weight": "Q6_K"}

    def more_bits(i: int) -> bool:  # llama.cpp's use_more_bits()
        n = num_layers
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    for i in range(num_layers):
        types[f"blk.{i}.attn_qkv.weight"] = "Q5_K"
        types[f"blk.{i}.ffn_down.weight"] = "Q6_K" if more_bits(i) else "Q4_K"
    return types  # everything else: Q4_K


WEIGHTS = {
    "q4_k_m": "Q4_K",
    "f16": "F16",
    "bf16": "BF16",
    "q8_0": "Q8_0",
    "q5_1": "Q5_1",
    "q5_0": "Q5_0",
    "q4_1": "Q4_1",
    "q4_0": "Q4_0",
    "q3_k": "Q3_K",
    "q2_k": "Q2_K",
}


def make_model(
    weights: str = "q4_k_m", layers: int = 32, shape: str = "mini-4k"
) -> tuple[Path, Path]:
    import phi3_fixtures as fx  # type: ignore[import-not-found, unused-ignore]

    OUT.mkdir(exist_ok=True)
    name = f"phi3-{shape}-shapes-{weights}" if shape != "mini-4k" else f"phi3-mini-shapes-{weights}"
    name += "" if layers == 32 else f"-{layers}-layers"
    model, tokenizer = OUT / f"{name}.gguf", OUT / "tokenizer.json"
    if not tokenizer.exists():
        fx.write_tokenizer_json(tokenizer)
    if not model.exists():
        print(f"writing {model.name} (once) ...", file=sys.stderr)
        fields = {**PHI3_MINI, **SHAPES[shape], "num_layers": layers}
        config = fx.TinyPhi3Config(**fields)  # type: ignore[arg-type, unused-ignore]
        partial = model.with_suffix(".partial")
        fx.write_phi3_gguf(
            partial,
            config,
            seed=0,
            weight_type=WEIGHTS[weights],
            tensor_types=q4_k_m_types(layers) if weights == "q4_k_m" else {},
        )
        partial.rename(model)
    return model, tokenizer


def weight_bytes_per_token(model: Path) -> int:
    """Bytes of weights a decode step reads: every matrix but the embedding (a row lookup)."""
    from gguf import GGUFReader

    reader = GGUFReader(model)
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")


class MemoryBandwidth:
    """Read bandwidth in bytes/s with `threads` threads (NumPy releases the GIL in sums): the
    best of several passes over a 1 GiB buffer split between them. Measured again beside
    every run, since this VM's memory speed moves by half from one minute to the next: each
    run's decode is then set against the bandwidth of its own minutes."""

    def __init__(self, threads: int, per_token: int) -> None:
        import numpy as np

        self.data = np.ones(1 << 27, dtype=np.float64)
        self.parts = np.array_split(self.data, threads)
        self.threads = threads
        self.per_token = per_token

    def run(
        self,
        engine: str,
        model: Path,
        tokenizer: Path,
        args: argparse.Namespace,
        kernels: str = "",
    ) -> dict[str, Any]:
        """A worker's run, beside the bandwidth read just before it, and the share of the
        bound of those minutes that its decode reached (weights only: after a short
        prompt)."""
        bandwidth = self.measure()
        result = run_worker(engine, model, tokenizer, args, kernels)
        result["bandwidth"] = bandwidth
        result["decode_bound_pct"] = 100 * result["decode_tps"] * self.per_token / bandwidth
        return result

    def measure(self) -> float:
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np

        best = float("inf")
        with ThreadPoolExecutor(self.threads) as pool:
            for _ in range(7):
                start = time.perf_counter()
                list(pool.map(np.sum, self.parts))
                best = min(best, time.perf_counter() - start)
        return float(self.data.nbytes / best)


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux's VmHWM is this program's own: `ru_maxrss` carries
    over the parent's peak across fork and exec (the benchmark's 1 GiB bandwidth buffer)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(n: int) -> list[int]:
    rng = random.Random(1)
    return [rng.randrange(300, 32000) for _ in range(n)]


# --------------------------------------------------------------------------- workers


def measure(
    prompt_then_decode: Callable[[int, int], tuple[float, float]],
    sizes: list[int],
    long_context: int,
    result: dict[str, Any],
) -> dict[str, Any]:
    """Each figure of one engine, through its `prompt_then_decode(n, decode)`: seconds to
    the first token of an n-token prompt, and tokens/s of `decode` more."""
    for n in sizes:
        ttft, _ = prompt_then_decode(n, 0)
        result[f"ttft{n}_s"], result[f"pp{n}_tps"] = ttft, n / ttft
    _, result["decode_tps"] = prompt_then_decode(SHORT_PROMPT, DECODE_TOKENS)
    if long_context:
        ttft, result["decode_long_tps"] = prompt_then_decode(long_context, DECODE_TOKENS)
        result[f"pp{long_context}_tps"] = long_context / ttft
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def work_candle(
    model: Path, tokenizer: Path, threads: int, sizes: list[int], long_context: int
) -> dict[str, Any]:
    from candle_phi import Phi3Generator

    start = time.perf_counter()
    # No prefix reuse: every prompt is computed in full, as llama.cpp's after a reset.
    gen = Phi3Generator(model, tokenizer=tokenizer, n_threads=threads, prefix_cache_bytes=0)
    result: dict[str, Any] = {"load_s": time.perf_counter() - start, "kernels": gen.kernels}
    greedy: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True, "repeat_penalty": 1.0}

    def prompt_then_decode(n: int, decode: int) -> tuple[float, float]:
        """Seconds to the first token of an n-token prompt; tokens/s of `decode` more."""
        stream = gen.generate(prompt_ids(n), max_tokens=decode + 1, **greedy)
        start = time.perf_counter()
        next(stream)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        for _ in stream:
            pass
        return ttft, decode / (time.perf_counter() - start) if decode else 0.0

    return measure(prompt_then_decode, sizes, long_context, result)


def load_llama(model: Path, threads: int, n_ctx: int) -> tuple[Any, float]:
    """llama.cpp on `model` as both benchmarks run it, and its load time in seconds."""
    from llama_cpp import Llama  # type: ignore[import-not-found, unused-ignore]

    start = time.perf_counter()
    llm = Llama(
        str(model),
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    return llm, time.perf_counter() - start


def next_token(llm: Any) -> int:
    """The argmax of the last position's logits (llama-cpp-python 0.3 keeps no scores of
    its own unless every position's logits are asked for)."""
    import numpy as np  # llama-cpp-python's own dependency

    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def work_llama(
    model: Path, tokenizer: Path, threads: int, sizes: list[int], long_context: int
) -> dict[str, Any]:
    n_ctx = max([*sizes, long_context, SHORT_PROMPT]) + DECODE_TOKENS + 1
    llm, load_s = load_llama(model, threads, n_ctx=n_ctx)
    from llama_cpp import llama_print_system_info

    # Which of its SIMD paths the loaded libggml was built with (`--llama-lib` picks one).
    features = llama_print_system_info().decode(errors="replace")
    built = [f.split("=")[0].strip() for f in features.split("|") if f.strip().endswith("= 1")]
    result: dict[str, Any] = {"load_s": load_s, "kernels": "llama.cpp " + " ".join(built)}

    def prompt_then_decode(n: int, decode: int) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt_ids(n))
        token = next_token(llm)  # the first, as TTFT counts it
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode):
            llm.eval([token])
            token = next_token(llm)
        return ttft, decode / (time.perf_counter() - start) if decode else 0.0

    return measure(prompt_then_decode, sizes, long_context, result)


WORKERS = {"candle-phi": work_candle, "llama.cpp": work_llama}


def run_worker(
    engine: str, model: Path, tokenizer: Path, args: argparse.Namespace, kernels: str = ""
) -> dict[str, Any]:
    env = dict(os.environ)
    if kernels:
        env["CANDLE_PHI_KERNELS"] = kernels
    if args.llama_lib:
        # llama-cpp-python loads libllama (and its libggml) from here instead of its own.
        env["LLAMA_CPP_LIB_PATH"] = str(args.llama_lib)
    command = [sys.executable, __file__, "--worker", engine, "--model", str(model)]
    command += ["--tokenizer", str(tokenizer), "--threads", str(args.threads)]
    command += ["--prompts", args.prompts, "--long-context", str(args.long_context)]
    return run_json(command, env=env)


def run_json(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 1800,
) -> dict[str, Any]:
    """Run a worker process; its result is the JSON object on the last line of its stdout.
    A failed worker's stderr is shown before the error is raised."""
    try:
        out = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.CalledProcessError as error:
        print(error.stderr, file=sys.stderr)
        raise
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def read_through(path: Path) -> None:
    """Read a file once, so that memory-mapping engines find it in the page cache."""
    with path.open("rb") as f:
        while f.read(1 << 24):
            pass


def run_rust_loop(model: Path, tokenizer: Path, threads: int) -> float:
    """Decode tokens/s of the engine driven from Rust, with no Python per token."""
    out = subprocess.run(
        [
            "cargo",
            "run",
            "--quiet",
            "--release",
            "--example",
            "decode",
            "--",
            str(model),
            str(tokenizer),
            str(DECODE_TOKENS),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=HERE.parent,
        timeout=3600,
        env={**os.environ, "CANDLE_NUM_THREADS": str(threads), "RAYON_NUM_THREADS": str(threads)},
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["decode_tps"])


# --------------------------------------------------------------------------- report


def metrics(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(result key, label) of each reported figure."""
    sizes = prompt_sizes(args.prompts)
    rows = [("load_s", "load time (s)")]
    rows += [(f"pp{n}_tps", f"prompt {n} tokens (tokens/s)") for n in sizes]
    if args.long_context:
        n = args.long_context
        rows.append((f"pp{n}_tps", f"prompt {n} tokens (tokens/s)"))
    if sizes:
        rows.append((f"ttft{sizes[0]}_s", f"time to first token, {sizes[0]}-token prompt (s)"))
    rows.append(("decode_tps", f"decode {DECODE_TOKENS} after {SHORT_PROMPT} tokens (tokens/s)"))
    rows.append(("decode_bound_pct", "that decode's share of the bandwidth bound (%)"))
    if args.long_context:
        rows.append(
            ("decode_long_tps", f"decode {DECODE_TOKENS} after {args.long_context} (tokens/s)")
        )
    rows.append(("peak_rss_mb", "peak RSS (MiB)"))
    return rows


def prompt_sizes(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.strip()]


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def machine() -> str:
    cpu = "unknown CPU"
    flags: set[str] = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown CPU":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    simd = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags)
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.machine()} [{simd}]"


def kernel_table(
    variants: list[str],
    model: Path,
    tokenizer: Path,
    args: argparse.Namespace,
    meter: MemoryBandwidth,
) -> list[str]:
    """candle-phi with each matmul kernel variant, runs interleaved, ratios to the first."""
    runs = args.runs
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for run in range(runs):
        for variant in variants if run % 2 == 0 else variants[::-1]:
            results[variant].append(meter.run("candle-phi", model, tokenizer, args, variant))
            print(
                f"run {run + 1}/{runs} kernels={variant}: {results[variant][-1]}", file=sys.stderr
            )
    first = variants[0]
    lines = [
        "",
        f"Kernel variants (CANDLE_PHI_KERNELS), median of {runs} runs, ratio to {first}:",
        "",
        "| metric | " + " | ".join(variants) + " |",
        "| --- |" + " --- |" * len(variants),
        "| kernels that ran | " + " | ".join(results[v][0]["kernels"] for v in variants) + " |",
    ]
    for key, label in metrics(args):
        base = statistics.median(r[key] for r in results[first])
        cells = []
        for v in variants:
            med = statistics.median(r[key] for r in results[v])
            cells.append(f"{med:.2f}" + ("" if v == first else f" ({med / base:.2f}x)"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--weights", choices=list(WEIGHTS), default="q4_k_m")
    parser.add_argument("--layers", type=int, default=32, help="Phi-3-mini has 32")
    parser.add_argument(
        "--shape", choices=list(SHAPES), default="mini-4k", help="mini-128k: LongRoPE"
    )
    parser.add_argument("--rust-loop", action="store_true", help="also time a pure-Rust decode")
    parser.add_argument(
        "--prompts", default=PROMPT_SIZES, help=f"prompt sizes (default {PROMPT_SIZES})"
    )
    parser.add_argument(
        "--long-context",
        type=int,
        default=LONG_CONTEXT,
        help=f"decode after a prompt this long (default {LONG_CONTEXT}; 0: not)",
    )
    parser.add_argument(
        "--kernels",
        help="also compare candle-phi's matmul kernels, e.g. avx-vnni,avx2,candle "
        "(CANDLE_PHI_KERNELS; 'candle' is Candle's own QMatMul)",
    )
    parser.add_argument(
        "--llama-lib",
        type=Path,
        help="a directory with another build of libllama.so for llama-cpp-python, e.g. one "
        "with AVX2 only to compare against CANDLE_PHI_KERNELS=avx2 on an AVX-512 CPU",
    )
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work = WORKERS[args.worker]
        sizes = prompt_sizes(args.prompts)
        print(json.dumps(work(args.model, args.tokenizer, args.threads, sizes, args.long_context)))
        return 0

    model, tokenizer = make_model(args.weights, args.layers, args.shape)
    read_through(model)  # both engines memory-map the file: neither pays the disk
    engines = ["candle-phi"] if args.skip_llama else ["candle-phi", "llama.cpp"]
    results: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    meter = MemoryBandwidth(args.threads, weight_bytes_per_token(model))
    for run in range(args.runs):
        for engine in engines if run % 2 == 0 else engines[::-1]:
            results[engine].append(meter.run(engine, model, tokenizer, args))
            print(f"run {run + 1}/{args.runs} {engine}: {results[engine][-1]}", file=sys.stderr)

    size = model.stat().st_size
    per_token = meter.per_token
    bandwidths = [r["bandwidth"] for runs in results.values() for r in runs]
    bandwidth = statistics.median(bandwidths)
    lines = [
        f"Machine: {machine()}; {args.threads} threads; {args.runs} runs; "
        f"model {size / 2**30:.2f} GiB (Phi-3-{args.shape} shapes, {args.layers} layers, "
        f"{args.weights}, random weights).",
        "",
        f"candle-phi's kernels: {results['candle-phi'][0]['kernels']}"
        + (f"; {results['llama.cpp'][0]['kernels']}" if "llama.cpp" in results else "")
        + ".",
        "",
        "| metric | candle-phi | llama.cpp | candle-phi / llama.cpp |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in metrics(args):
        ours = [r[key] for r in results["candle-phi"]]
        theirs = [r[key] for r in results.get("llama.cpp", [])]
        ratio = f"{statistics.median(ours) / statistics.median(theirs):.2f}" if theirs else "-"
        lines.append(
            f"| {label} | {summary(ours)} | {summary(theirs) if theirs else '-'} | {ratio} |"
        )
    # The default f16 cache: keys and values of 32 heads x 96 per layer, 2 bytes each.
    kv_per_token = 2 * args.layers * 32 * 96 * 2
    context = max([*prompt_sizes(args.prompts), args.long_context]) + DECODE_TOKENS + 1
    kv_mb = kv_per_token * context / 2**20
    lines += [
        "",
        f"Decode bound from memory bandwidth: {per_token / 2**20:.0f} MiB of weights read per "
        f"token / {bandwidth / 2**30:.1f} GiB/s ({args.threads}-thread read of a 1 GiB buffer, "
        f"median of one before each run: {min(bandwidths) / 2**30:.1f}-"
        f"{max(bandwidths) / 2**30:.1f}) = {bandwidth / per_token:.2f} tokens/s; each run's "
        "decode against the bound of its own minutes is the table's share row. "
        "RSS budget (issue target): GGUF "
        f"{size / 2**20:.0f} MiB x 1.10 + KV cache of the {context}-token context "
        f"{kv_mb:.0f} MiB = {size / 2**20 * 1.10 + kv_mb:.0f} MiB.",
    ]
    if args.long_context:
        read = per_token + kv_per_token * args.long_context
        lines.append(
            f"Decode after {args.long_context} tokens also reads their keys and values (f16): "
            f"{read / 2**20:.0f} MiB a token, a bound of {bandwidth / read:.2f} tokens/s."
        )
    if args.rust_loop:
        # Interleaved with Python runs of the same decode, so both see the same conditions.
        rust, python = [], []
        for _ in range(args.runs):
            rust.append(run_rust_loop(model, tokenizer, args.threads))
            python.append(run_worker("candle-phi", model, tokenizer, args)["decode_tps"])
        r, p = statistics.median(rust), statistics.median(python)
        lines.append(
            f"Python iterator vs pure-Rust loop (decode, {args.runs} interleaved runs each): "
            f"{summary(python)} vs {summary(rust)} tokens/s, {(1 - p / r) * 100:+.1f}% cost."
        )
    if args.kernels:
        lines += kernel_table(args.kernels.split(","), model, tokenizer, args, meter)
    report = "\n".join(lines)
    print(report)
    (OUT / "latest.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
