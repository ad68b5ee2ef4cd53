"""A bounded load test on loopback: 32 clients x 10 requests, streaming and not, some
cancelling mid-stream. None may fail, and the process's memory must come back."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from serving import EVENT_TIMEOUT_S, serve_process

CLIENTS = 32
REQUESTS_PER_CLIENT = 10


def one_request(client: httpx.Client, url: str, n: int) -> str:
    """Request n of a client: streamed, whole, or streamed and dropped after one chunk.
    Returns what went wrong, or "" when it went as it should."""
    messages = [{"role": "user", "content": f"Request {n}: say something about {n % 7}"}]
    body = {"messages": messages, "max_tokens": 24, "temperature": 0.7, "seed": n}
    kind = n % 3
    if kind == 1:
        response = client.post(url, json=body)
        if response.status_code != 200:
            return f"whole: {response.status_code} {response.text[:300]}"
        return "" if response.json()["choices"][0]["finish_reason"] else "no finish_reason"
    with client.stream("POST", url, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            return f"stream: {response.status_code}"
        data = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                data.append(line[6:])
                if kind == 2 and len(data) == 2:
                    return ""  # leaving the block closes the connection mid-stream
        if data[-1] != "[DONE]":
            return f"stream ended without [DONE]: {data[-1][:200]}"
        return "" if json.loads(data[-2])["choices"][0]["finish_reason"] else "no finish"


def load(url: str, requests_per_client: int) -> list[str]:
    def client_run(c: int) -> list[str]:
        with httpx.Client(timeout=EVENT_TIMEOUT_S) as client:
            return [
                one_request(client, url + "/v1/chat/completions", c * requests_per_client + r)
                for r in range(requests_per_client)
            ]

    with ThreadPoolExecutor(CLIENTS) as pool:
        return [f for fs in pool.map(client_run, range(CLIENTS)) for f in fs if f]


def test_32_clients_10_requests_each_no_failures_memory_comes_back(
    model_path: Path, tokenizer_path: Path
) -> None:
    # As many may wait as there are clients: none is refused, all share 8 running slots.
    args = ["--max-concurrency", "8", "--max-queue", str(CLIENTS)]
    args += ["--prefix-cache-bytes", str(4 << 20)]  # bounded, so it fills in the first round
    with serve_process("--model", str(model_path), "--tokenizer", str(tokenizer_path), *args) as s:
        # A first round grows what grows to a plateau: threads, pools, the prefix cache.
        # A leak would grow again in the second.
        assert load(s.url, REQUESTS_PER_CLIENT) == []
        s.wait_idle()
        before = s.rss_bytes()
        assert load(s.url, REQUESTS_PER_CLIENT) == []
        s.wait_idle()  # cancelled ones included: nothing left running
        after = s.rss_bytes()
        assert s.stop() == 130  # Ctrl-C, as the command line reports it
    growth = (after - before) / before
    print(f"server RSS {before >> 20} MiB -> {after >> 20} MiB ({growth:+.1%})")
    assert growth < 0.05, f"RSS grew from {before} to {after} bytes ({growth:+.1%})"
