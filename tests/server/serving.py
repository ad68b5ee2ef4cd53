"""Servers for the tests: the real app under uvicorn, in a thread, on a free loopback port."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from candle_phi import Phi3Generator
from candle_phi.server import ServerSettings, create_app
from candle_phi.server.runner import Runner

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
