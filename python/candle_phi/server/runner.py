"""Running generations for the event loop: admission, worker threads, cancellation.

Each admitted request gets one worker thread that creates its stream and iterates it;
the engine batches the steps of streams iterated from different threads into shared passes.
Events travel to the event loop through ``call_soon_threadsafe``, so the loop never blocks on
the model. Cancelling the consumer (a client that went away) cancels the stream, which stops
at its next layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from candle_phi import CandlePhiError, ContextLengthError, Phi3Generator, TokenEvent, TokenStream
from candle_phi.server import memory
from candle_phi.server.errors import APIError, from_engine
from candle_phi.server.requests import Job
from candle_phi.server.settings import ServerSettings

_END = object()


class Runner:
    """At most ``max_concurrency`` generations at once, ``max_queue`` more waiting."""

    def __init__(self, generator: Phi3Generator, settings: ServerSettings) -> None:
        self.generator = generator
        self.settings = settings
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._threads = ThreadPoolExecutor(
            settings.max_concurrency, thread_name_prefix="candle-phi-generation"
        )
        self._live: set[TokenStream] = set()
        self._changed = threading.Condition()
        self._idle = asyncio.Event()
        self._idle.set()
        self._trimming = False

    async def start(self, job: Job) -> Generation:
        """Admit ``job`` and create its stream; raises APIError for what the client sent."""
        if (
            self.running >= self.settings.max_concurrency
            and self.waiting >= self.settings.max_queue
        ):
            raise APIError(
                503,
                f"the server is busy: {self.running} requests running and {self.waiting} "
                "waiting; retry later",
                type="server_error",
                code="server_busy",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        self.waiting += 1
        self._idle.clear()
        try:
            await self._slots.acquire()
        except BaseException:  # the client left while waiting
            self.waiting -= 1
            self._settle()
            raise
        self.waiting -= 1
        self.running += 1
        loop = asyncio.get_running_loop()
        try:
            stream = await loop.run_in_executor(self._threads, self._create, job)
        except BaseException:
            self._leave()
            raise
        with self._changed:
            self._live.add(stream)
            self._changed.notify_all()
        return Generation(self, stream, loop)

    def _create(self, job: Job) -> TokenStream:
        try:
            try:
                return self._open(job, job.options)
            except ContextLengthError:
                if job.max_tokens_given or job.options.get("max_tokens") is None:
                    raise
                # The server's default cap does not fit beside this prompt: fill the context.
                return self._open(job, {**job.options, "max_tokens": None})
        except ContextLengthError as err:
            api = from_engine(err)
            api.param = job.prompt_param
            raise api from None
        except CandlePhiError as err:
            raise from_engine(err) from None

    def _open(self, job: Job, options: Any) -> TokenStream:
        if job.kind == "chat":
            return self.generator.chat(job.messages, **options)
        assert job.prompt is not None
        return self.generator.generate(job.prompt, **options)

    def _leave(self) -> None:
        self.running -= 1
        self._slots.release()
        self._settle()

    def _settle(self) -> None:
        """On the loop: when the last request ends, trim memory, then say idle."""
        if self.running or self.waiting or self._trimming:
            return
        # A burst is over: give back what it freed, on a worker (all are free now).
        self._trimming = True
        loop = asyncio.get_running_loop()
        trimmed = self._threads.submit(memory.trim)
        trimmed.add_done_callback(lambda _: _post(loop, self._trimmed))

    def _trimmed(self) -> None:
        self._trimming = False
        if self.running == 0 and self.waiting == 0:
            self._idle.set()

    async def idle(self, timeout: float) -> bool:
        """Wait (on the event loop) until no request runs or waits, at most ``timeout`` s."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            return False
        return True

    def _ended(self, stream: TokenStream, loop: asyncio.AbstractEventLoop) -> None:
        with self._changed:
            self._live.discard(stream)
            self._changed.notify_all()
        _post(loop, self._leave)

    def cancel_all(self) -> None:
        """Stop every running generation (at shutdown)."""
        with self._changed:
            for stream in self._live:
                stream.cancel()

    @property
    def live(self) -> int:
        """Generations started and not yet ended (their worker done, their stream closed)."""
        return len(self._live)

    def wait_for(self, predicate: Callable[[Runner], bool], timeout: float) -> bool:
        """Block another thread until ``predicate(self)`` holds after a start or an end."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    def shutdown(self) -> None:
        self.cancel_all()
        self._threads.shutdown(wait=True)


class Generation:
    """One admitted request's stream, iterated by a worker thread."""

    def __init__(
        self, runner: Runner, stream: TokenStream, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.runner = runner
        self.stream = stream
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        loop.run_in_executor(runner._threads, self._work)

    def _work(self) -> None:
        def push(item: object) -> None:
            _post(self._loop, self._queue.put_nowait, item)

        try:
            for event in self.stream.events():
                push(event)
            push(_END)
        except CandlePhiError as err:
            push(from_engine(err))
        except BaseException as err:
            push(err)
        finally:
            self.stream.close()
            self.runner._ended(self.stream, self._loop)

    async def events(self) -> AsyncIterator[TokenEvent]:
        """The stream's events; leaving early (or being cancelled) cancels the stream."""
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stream.cancel()


def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is left to tell
        loop.call_soon_threadsafe(callback, *args)
