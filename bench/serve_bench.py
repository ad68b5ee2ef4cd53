"""OpenAI-compatible servers under concurrent streaming clients: candle-phi, llama-server and
llama-cpp-python's server on the same GGUF, in the same run.

    python bench/serve_bench.py --llama-server /tmp/peers/llama-server \\
        --llama-cpp-python-venv /tmp/peers/venv --clients 1,2,4,8 --requests-per-client 2

The model is bench.py's: Phi-3-mini-4k-instruct's shapes, the Q4_K_M tensor-type mix, random
weights (built once into bench/.out/, ~2.2 GB). Each server runs as a subprocess on 127.0.0.1
and a free port, with the same thread count; once it answers GET /health (or /v1/models) it
gets one warm-up request, then, for each client count N, N threads that each send
--requests-per-client streaming POST /v1/completions (greedy, ignore_eos, --max-tokens tokens)
one after the other. Every request's prompt is the same ~100 tokens behind its own number, so
no server answers from a prompt cache. Per level: aggregate decode tokens/s (the tokens after
each request's first, over the time during which any request was past its first: prompts of
staggered requests run inside it), decode tokens/s while every client had a request past its
first token (the batched decode step alone), tokens/s with prompts included (all completion
tokens / wall time from the first request sent to the last one done), time to first token (first
chunk with text) and request latency, p50/p95. Server logs go to bench/.out/serve-*.log, the
figures to bench/.out/serve_bench.json and serve_bench.md. A peer that is missing is skipped
with a note. All get repeat_penalty 1.0; llama-cpp-python, which drops ignore_eos, gets
min_tokens instead, serves one request at a time, and reports no usage when streaming (its
tokens are counted as chunks with text). This is not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

import bench

SERVERS = ("candle-phi", "llama-server", "llama-cpp-python")
PROMPT = (
    "You are a friendly model that gives short, clear and correct answers. "
    "Tell me a story about a little robot who wanted to learn to sing. "
    "Once upon a time there was a robot that lived in a small town. "
    "Every morning it would walk to the river and listen to the birds. "
    "The weather is nice and the sun is shining over the mountains. "
    "The quick brown fox jumps over the lazy dog near the river bank. "
    "Explain why the sky is blue in simple words for a child."
)  # 104 tokens with the fixture tokenizer; "<n>. " in front adds 3-5
SLOTS = 8  # parallel sequences each server is started with


@dataclass
class Result:
    """One streamed request. Times in seconds from when it was sent."""

    ttft_s: float | None
    latency_s: float
    completion_tokens: int
    prompt_tokens: int | None
    tokens_from: str  # "usage", "timings" (llama-server's own counts) or "chunks"
    error: str | None = None
    sent_at: float = 0.0  # time.perf_counter() when it was sent
    chunk_at: list[float] = field(default_factory=list)  # each chunk with text, from sent_at


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(
    name: str, args: argparse.Namespace, model: Path, tokenizer: Path, port: int
) -> list[str]:
    host, threads = "127.0.0.1", str(args.threads)
    if name == "candle-phi":
        return [
            *(sys.executable, "-m", "candle_phi", "serve"),
            *("--model", str(model), "--tokenizer", str(tokenizer)),
            *("--host", host, "--port", str(port)),
            *("--max-concurrency", str(SLOTS), "--threads", threads),
        ]
    if name == "llama-server":
        # -c is split between the -np slots: 256 each fits the prompt and the reply.
        return [
            *(str(args.llama_server), "-m", str(model), "--host", host, "--port", str(port)),
            *("-np", str(SLOTS), "-c", str(SLOTS * (128 + 64 + 64))),
            *("-t", threads, "-tb", threads, "-cb"),
        ]
    if name == "llama-cpp-python":
        # It serves one request at a time; by default a new request interrupts the stream
        # of the one in progress, which would cut concurrent clients short.
        return [
            *(str(args.llama_cpp_python_venv / "bin" / "python"), "-m", "llama_cpp.server"),
            *("--model", str(model), "--host", host, "--port", str(port)),
            *("--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "2048"),
            *("--interrupt_requests", "False"),
        ]
    raise ValueError(name)


def missing(name: str, args: argparse.Namespace) -> str | None:
    """Why server `name` cannot run here, or None when it can."""
    if name == "candle-phi":
        command = [sys.executable, "-m", "candle_phi", "serve", "--help"]
        what = "`python -m candle_phi serve`"
    elif name == "llama-server":
        if not os.access(args.llama_server, os.X_OK):
            return f"no executable at {args.llama_server} (--llama-server)"
        command, what = [str(args.llama_server), "--version"], str(args.llama_server)
    else:
        python = args.llama_cpp_python_venv / "bin" / "python"
        if not python.exists():
            return f"no {python} (--llama-cpp-python-venv)"
        command, what = [str(python), "-c", "import llama_cpp.server.app"], f"{python}: import"
    try:
        subprocess.run(command, capture_output=True, check=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as error:
        return f"{what} failed ({type(error).__name__})"
    return None


def wait_ready(base: str, server: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll GET /health, or /v1/models where there is no /health, until one answers 200."""
    deadline = time.monotonic() + timeout
    paths = ["/health", "/v1/models"]
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"server exited with code {server.returncode}; {log}:\n{tail}")
        try:
            status = httpx.get(base + paths[0], timeout=5).status_code
            if status == 200:
                return
            if status == 404 and len(paths) > 1:
                paths.pop(0)
                continue
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.25)
    raise TimeoutError(f"{base} not ready after {timeout:.0f} s; see {log}")


def model_id(base: str) -> str:
    try:
        return str(httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return "default"


def stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


# --------------------------------------------------------------------------- clients


def stream_completion(client: httpx.Client, body: dict[str, Any]) -> Result:
    """POST /v1/completions with stream=true; read the server-sent events to [DONE]."""
    start = time.perf_counter()
    ttft, chunks, usage, timings = None, 0, None, None
    chunk_at: list[float] = []
    try:
        with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"error event: {str(event['error'])[:200]}")
                usage = event.get("usage") or usage
                timings = event.get("timings") or timings
                if any(choice.get("text") for choice in event.get("choices") or []):
                    chunks += 1
                    chunk_at.append(time.perf_counter() - start)
                    if ttft is None:
                        ttft = chunk_at[0]
    except (httpx.HTTPError, RuntimeError, ValueError) as error:
        latency = time.perf_counter() - start
        return Result(ttft, latency, chunks, None, "chunks", f"{type(error).__name__}: {error}")
    latency = time.perf_counter() - start
    if usage and usage.get("completion_tokens") is not None:
        prompt = usage.get("prompt_tokens")
        prompt_tokens = None if prompt is None else int(prompt)
        count, source = int(usage["completion_tokens"]), "usage"
    elif timings and timings.get("predicted_n") is not None:
        count, prompt_tokens, source = int(timings["predicted_n"]), None, "timings"
    else:
        count, prompt_tokens, source = chunks, None, "chunks"
    return Result(ttft, latency, count, prompt_tokens, source, sent_at=start, chunk_at=chunk_at)


def request_body(name: str, model: str, number: int, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": f"{number}. {PROMPT}",
        "max_tokens": max_tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,  # llama-cpp-python's default is 1.1
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if name == "llama-cpp-python":
        # Its request model has no ignore_eos (it drops the field), but min_tokens holds the
        # end token back until then.
        body["min_tokens"] = max_tokens
    return body


def run_level(
    base: str, name: str, model: str, clients: int, requests: int, max_tokens: int, first: int
) -> tuple[float, list[Result]]:
    """`clients` threads, each sending `requests` requests in turn; the wall time and results.
    Prompts are numbered from `first`."""
    results: list[list[Result]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    timeout = httpx.Timeout(1800, connect=30)

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=timeout) as http:
            barrier.wait()
            for r in range(requests):
                body = request_body(name, model, first + i * requests + r, max_tokens)
                results[i].append(stream_completion(http, body))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, [r for rs in results for r in rs]


def percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p95 = np.percentile(values, [50, 95])
    return float(p50), float(p95)


def steady_decode(done: list[Result], clients: int) -> float | None:
    """Decode tokens/s while every client had a request decoding: the batched decode step
    itself, without the prompts that staggered requests bring into the decode spans above
    (at one client, the same spans). A request's tokens after its first are spread over its
    text chunks after the first (a chunk may carry a few tokens, or wait for a character's
    last byte)."""
    spans = [
        (r.sent_at + r.chunk_at[0], r.sent_at + r.latency_s)
        for r in done
        if len(r.chunk_at) > 1 and r.completion_tokens > 1
    ]
    events = sorted([(begin, 1) for begin, _ in spans] + [(end, -1) for _, end in spans])
    windows, active, opened = [], 0, 0.0
    for at, change in events:
        if active == clients and change < 0:
            windows.append((opened, at))
        active += change
        if active == clients and change > 0:
            opened = at
    seconds = sum(end - begin for begin, end in windows)
    if seconds <= 0:
        return None
    tokens = 0.0
    for r in done:
        later = [r.sent_at + t for t in r.chunk_at[1:]]
        if not later or r.completion_tokens <= 1:
            continue
        inside = sum(any(b < t <= e for b, e in windows) for t in later)
        tokens += (r.completion_tokens - 1) * inside / len(later)
    return tokens / seconds


def summarize(wall_s: float, results: list[Result], clients: int) -> dict[str, Any]:
    done = [r for r in results if r.error is None]
    # Decode throughput: the tokens after each request's first, over the time during which
    # at least one request was decoding (after its first token, before its end). A server
    # that decodes one request at a time gets its single-stream speed, however many wait.
    spans = sorted(
        (r.sent_at + r.ttft_s, r.sent_at + r.latency_s)
        for r in done
        if r.ttft_s is not None and r.completion_tokens > 1
    )
    decoding_s, reach = 0.0, float("-inf")
    for begin, end in spans:
        decoding_s += max(0.0, end - max(begin, reach))
        reach = max(reach, end)
    after_first = sum(r.completion_tokens - 1 for r in done if r.ttft_s is not None)
    decode = after_first / decoding_s if decoding_s > 0 else None
    tokens = sum(r.completion_tokens for r in done)
    steady = steady_decode(done, clients)
    ttft = percentiles([r.ttft_s for r in done if r.ttft_s is not None])
    latency = percentiles([r.latency_s for r in done])
    return {
        "wall_s": wall_s,
        "requests": len(results),
        "errors": len(results) - len(done),
        "completion_tokens": tokens,
        "aggregate_tps": tokens / wall_s if done else None,
        "aggregate_decode_tps": decode,
        "steady_decode_tps": steady,
        "ttft_p50_s": ttft[0],
        "ttft_p95_s": ttft[1],
        "latency_p50_s": latency[0],
        "latency_p95_s": latency[1],
        "tokens_from": sorted({r.tokens_from for r in done}),
        "results": [asdict(r) for r in results],
    }


def bench_server(
    name: str, args: argparse.Namespace, model: Path, tokenizer: Path
) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = server_command(name, args, model, tokenizer, port)
    env = dict(os.environ)
    if name == "candle-phi" and args.kernels:
        env["CANDLE_PHI_KERNELS"] = args.kernels
    log = bench.OUT / f"serve-{name}.log"
    print(f"{name}: {' '.join(command)}", file=sys.stderr)
    with log.open("wb") as out:
        start = time.perf_counter()
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(base, server, log, args.startup_timeout)
        startup_s = time.perf_counter() - start
        served = model_id(base)
        print(f"{name}: ready in {startup_s:.1f} s, model {served!r}", file=sys.stderr)
        _, warmup = run_level(base, name, served, 1, 1, 8, first=0)
        if warmup[0].error:
            raise RuntimeError(f"{name}: warm-up request failed: {warmup[0].error}")
        levels: dict[str, Any] = {}
        first = 1
        for clients in args.clients:
            wall_s, results = run_level(
                base, name, served, clients, args.requests_per_client, args.max_tokens, first
            )
            first += len(results)
            levels[str(clients)] = level = summarize(wall_s, results, clients)
            print(
                f"{name}: {clients} clients: {level['completion_tokens']} tokens in "
                f"{wall_s:.1f} s, {fmt(level['aggregate_tps'])} tokens/s, decode "
                f"{fmt(level['aggregate_decode_tps'])} tokens/s (all decoding: "
                f"{fmt(level['steady_decode_tps'])}), {level['errors']} errors",
                file=sys.stderr,
            )
            for r in results:
                if r.error:
                    print(f"  {r.error}", file=sys.stderr)
    finally:
        stop(server)
    return {"command": command, "startup_s": startup_s, "model_id": served, "levels": levels}


# --------------------------------------------------------------------------- report


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def level_of(report: dict[str, Any], server: str, clients: int) -> dict[str, Any] | None:
    levels: dict[str, Any] = report["servers"].get(server, {}).get("levels", {})
    return levels.get(str(clients))


def ratio(
    a: dict[str, Any] | None, b: dict[str, Any] | None, key: str = "aggregate_decode_tps"
) -> float | None:
    if not a or not b or not a[key] or not b[key]:
        return None
    return float(a[key] / b[key])


def table(report: dict[str, Any], args: argparse.Namespace) -> list[str]:
    lines = [
        f"Machine: {report['machine']}; {args.threads} threads per server; "
        f"requests per client: {args.requests_per_client}; prompt {report['prompt_tokens']} "
        f"tokens, {args.max_tokens} tokens out (greedy, end token ignored); model "
        f"{report['model_gib']:.2f} GiB (Phi-3-mini shapes, Q4_K_M mix, random weights).",
        "",
        "| server | clients | tokens | aggregate decode tokens/s | decode tokens/s, all "
        "clients decoding | tokens/s, prompts included | TTFT p50 / p95 (s) "
        "| latency p50 / p95 (s) | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for server, data in report["servers"].items():
        for clients, level in data["levels"].items():
            lines.append(
                f"| {server} | {clients} | {level['completion_tokens']} "
                f"| {fmt(level['aggregate_decode_tps'])} "
                f"| {fmt(level.get('steady_decode_tps'))} "
                f"| {fmt(level['aggregate_tps'])} "
                f"| {fmt(level['ttft_p50_s'])} / {fmt(level['ttft_p95_s'])} "
                f"| {fmt(level['latency_p50_s'])} / {fmt(level['latency_p95_s'])} "
                f"| {level['errors']} |"
            )
    startups = ", ".join(f"{s} {d['startup_s']:.1f} s" for s, d in report["servers"].items())
    lines += ["", f"Start-up to ready: {startups or '-'}."]
    ratios = report["ratios"]
    scaling = ratios.get("candle-phi 4 clients / 1 client")
    steady = ratios.get("candle-phi 4 clients / 1 client, all decoding")
    lines.append(
        f"candle-phi decode, 4 clients / 1 client: aggregate {fmt(scaling)}, "
        f"all clients decoding {fmt(steady)}"
    )
    key = "candle-phi / llama-server, {} clients"
    vs = (f"{c}: {fmt(ratios.get(key.format(c)))}" for c in args.clients)
    lines.append("candle-phi / llama-server aggregate decode by clients: " + ", ".join(vs))
    for server, note in report["skipped"].items():
        lines.append(f"Skipped {server}: {note}.")
    return lines


def client_counts(text: str) -> list[int]:
    counts = [int(c) for c in text.split(",")]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("client counts are integers >= 1")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=client_counts, default=[1, 2, 4, 8], help="1,2,4,8")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="each server's threads")
    parser.add_argument("--llama-server", type=Path, default=Path("/tmp/peers/llama-server"))
    parser.add_argument(
        "--llama-cpp-python-venv", type=Path, default=Path("/tmp/peers/venv"), help="with [server]"
    )
    parser.add_argument("--skip-peers", action="store_true", help="candle-phi only")
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help="a subset of " + ",".join(SERVERS)
    )
    parser.add_argument("--kernels", help="CANDLE_PHI_KERNELS for candle-phi (see bench.py)")
    parser.add_argument("--startup-timeout", type=float, default=900, help="seconds")
    args = parser.parse_args()
    wanted = ["candle-phi"] if args.skip_peers else args.servers.split(",")
    if unknown := set(wanted) - set(SERVERS):
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")

    model, tokenizer = bench.make_model()
    bench.read_through(model)  # every server memory-maps the file: none pays the disk
    report: dict[str, Any] = {
        "machine": bench.machine(),
        "model": str(model),
        "model_gib": model.stat().st_size / 2**30,
        "prompt_tokens": "~107",  # candle-phi's tokenizer, before usage reports it
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "servers": {},
        "skipped": {},
        "ratios": {},
    }
    print(f"Machine: {report['machine']}", file=sys.stderr)
    for name in (s for s in SERVERS if s in wanted):
        if note := missing(name, args):
            print(f"skipping {name}: {note}", file=sys.stderr)
            report["skipped"][name] = note
            continue
        try:
            report["servers"][name] = bench_server(name, args, model, tokenizer)
        except (RuntimeError, TimeoutError, OSError) as error:
            print(f"skipping {name}: {error}", file=sys.stderr)
            report["skipped"][name] = str(error).splitlines()[0]

    prompt_counts = {
        r["prompt_tokens"]
        for data in report["servers"].values()
        for level in data["levels"].values()
        for r in level["results"]
        if r["prompt_tokens"]
    }
    if prompt_counts:
        low, high = min(prompt_counts), max(prompt_counts)
        report["prompt_tokens"] = str(low) if low == high else f"{low}-{high}"
    ratios = report["ratios"]
    ratios["candle-phi 4 clients / 1 client"] = ratio(
        level_of(report, "candle-phi", 4), level_of(report, "candle-phi", 1)
    )
    ratios["candle-phi 4 clients / 1 client, all decoding"] = ratio(
        level_of(report, "candle-phi", 4), level_of(report, "candle-phi", 1), "steady_decode_tps"
    )
    for clients in args.clients:
        ratios[f"candle-phi / llama-server, {clients} clients"] = ratio(
            level_of(report, "candle-phi", clients), level_of(report, "llama-server", clients)
        )
    text = "\n".join(table(report, args))
    print(text)
    bench.OUT.mkdir(exist_ok=True)
    (bench.OUT / "serve_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (bench.OUT / "serve_bench.md").write_text(text + "\n")
    return 0 if report["servers"] else 1


if __name__ == "__main__":
    sys.exit(main())
