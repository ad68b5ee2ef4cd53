"""Servers for the tests: the real app under uvicorn in a thread, or `candle-phi serve` in a
child process, on a free loopback port. A pytest plugin of tests/conftest.py (a conftest.py
here would shadow that one's name for `from conftest import ...`)."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from candle_phi import Phi3Generator
from candle_phi.server import ServerSettings, create_app
from candle_phi.server.runner import Runner
from child_signals import sigint_reaches_children

# Time limits for waiting on events that come in well under a second; a failure, not a pace.
EVENT_TIMEOUT_S = 120.0


@dataclass
class Served:
    url: str
    generator: Phi3Generator
    runner: Runner
    settings: ServerSettings

    def wait_idle(self) -> None:
        assert self.runner.wait_for(lambda r: r.live == 0, EVENT_TIMEOUT_S), "still running"


@contextmanager
def serve(generator: Phi3Generator, settings: ServerSettings | None = None) -> Iterator[Served]:
    settings = settings or ServerSettings(model_name="tiny-phi3")
    app = create_app(generator, settings)
    # Listening before uvicorn starts: clients that connect early wait in the backlog.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    served = Served(f"http://127.0.0.1:{port}", generator, app.state.runner, settings)
    try:
        yield served
        served.wait_idle()
    finally:
        server.should_exit = True
        thread.join(EVENT_TIMEOUT_S)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@dataclass
class ServeProcess:
    """``python -m candle_phi serve`` running in a child process."""

    url: str
    process: subprocess.Popen[str]
    stderr: queue.Queue[str | None]  # its lines as they come; None at the end

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def wait_idle(self) -> None:
        health = httpx.get(self.url + "/health", params={"wait_idle": EVENT_TIMEOUT_S},
                           timeout=EVENT_TIMEOUT_S + 10).json()  # fmt: skip
        assert health["running"] == health["waiting"] == health["active_streams"] == 0, health

    def next_line(self) -> str | None:
        return self.stderr.get(timeout=EVENT_TIMEOUT_S)

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; its exit code (130 after a clean shutdown)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(EVENT_TIMEOUT_S)
        finally:
            if self.process.poll() is None:
                self.process.kill()


@contextmanager
def serve_process(*args: str, env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
    command = [sys.executable, "-m", "candle_phi", "serve", "--port", "0", *args]
    with sigint_reaches_children():  # `stop` sends it Ctrl-C
        process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen = []
    while (line := lines.get(timeout=EVENT_TIMEOUT_S)) is not None:
        seen.append(line)
        if found := re.search(r"serving \S+ on (http://\S+)", line):
            break
    else:
        process.wait(EVENT_TIMEOUT_S)
        raise AssertionError(f"serve exited with {process.returncode}: {''.join(seen)}")
    served = ServeProcess(found[1], process, lines)
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def served(generator: Phi3Generator) -> Iterator[Served]:
    with serve(generator) as s:
        yield s


@pytest.fixture(scope="module")
def served_slow(slow_generator: Phi3Generator) -> Iterator[Served]:
    """A model slow enough that a request is still running when the test acts on it."""
    with serve(slow_generator, ServerSettings(model_name="slow", max_concurrency=4)) as s:
        yield s
