"""`async for` and `aread()` over a stream: each step runs in a worker thread (the model
work releases the GIL), so the event loop stays free. Cancelling the awaiting task cancels
the generation, which stops at its next layer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TypeVar

from ._native import TokenStream

T = TypeVar("T")


def _next_or_stop(iterator: Iterator[T]) -> tuple[bool, T | None]:
    # StopIteration cannot cross a Future, so the end travels as a flag.
    for item in iterator:
        return True, item
    return False, None


async def _off_loop(stream: TokenStream, call: Callable[[], T]) -> T:
    try:
        return await asyncio.get_running_loop().run_in_executor(None, call)
    except asyncio.CancelledError:
        stream.cancel()
        raise


async def anext(iterator: Iterator[T], stream: TokenStream) -> T:
    """The next item of `iterator` (a stream or its events), computed off the loop."""
    more, item = await _off_loop(stream, lambda: _next_or_stop(iterator))
    if not more:
        raise StopAsyncIteration
    return item  # type: ignore[return-value]  # present whenever `more` is


async def aread(stream: TokenStream) -> str:
    """The rest of the text, computed off the loop."""
    return await _off_loop(stream, stream.read)
