"""`python -m candle_phi serve` as users run it: a child process on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from serving import serve_process


def test_serve_binds_loopback_answers_and_stops_on_ctrl_c(
    model_path: Path, tokenizer_path: Path
) -> None:
    with serve_process("--model", str(model_path), "--tokenizer", str(tokenizer_path)) as s:
        assert s.url.startswith("http://127.0.0.1:")
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
        models = httpx.get(s.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny-phi3"]  # the file's name
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        reply = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert reply["usage"]["completion_tokens"] > 0
        assert s.stop() == 130  # Ctrl-C, as the command line reports it
        rest = []
        while (line := s.next_line()) is not None:
            rest.append(line)
        assert "Traceback" not in "".join(rest)


def test_verbose_logs_one_access_line_per_request(model_path: Path, tokenizer_path: Path) -> None:
    args = ["--model", str(model_path), "--tokenizer", str(tokenizer_path), "-v"]
    with serve_process(*args, "--model-name", "mine") as s:
        for path in ("/health", "/v1/models", "/nowhere"):
            httpx.get(s.url + path)
        logged = []
        while len(logged) < 3:
            line = s.next_line()
            assert line is not None
            if "candle_phi.server" in line:
                logged.append(line)
    assert [line.split(" ", 5)[5].rsplit(" ", 2)[0] for line in logged] == [
        '"GET /health" 200',
        '"GET /v1/models" 200',
        '"GET /nowhere" 404',
    ]


def test_the_api_key_can_come_from_the_environment(model_path: Path, tokenizer_path: Path) -> None:
    args = ["--model", str(model_path), "--tokenizer", str(tokenizer_path)]
    with serve_process(*args, env={"CANDLE_PHI_API_KEY": "k3y"}) as s:
        assert httpx.get(s.url + "/v1/models").status_code == 401
        auth = {"Authorization": "Bearer k3y"}
        assert httpx.get(s.url + "/v1/models", headers=auth).status_code == 200


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "candle_phi", "serve", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_missing_model_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    done = run_cli("--model", str(tmp_path / "missing.gguf"), "--port", "0")
    assert done.returncode == 1
    assert done.stderr.startswith("candle-phi: error:") and "Traceback" not in done.stderr


def test_help_names_the_safety_options() -> None:
    done = run_cli("--help")
    assert done.returncode == 0
    for flag in ("--api-key", "--host", "--max-concurrency", "--max-queue", "--max-body-bytes"):
        assert flag in done.stdout
