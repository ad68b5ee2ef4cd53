"""`async for` and `aread()` compute off the event loop: the loop stays responsive, several
streams progress together, and cancelling the consuming task cancels the generation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from candle_phi import Phi3Generator, TokenStream
from conftest import CHAT_PROMPT

LONG_PROMPT = CHAT_PROMPT + " the" * 1500


async def collect(stream: TokenStream) -> str:
    return "".join([piece async for piece in stream])


def test_async_iteration_and_aread_give_the_sync_text(generator: Phi3Generator) -> None:
    expected = generator.generate(CHAT_PROMPT, max_tokens=20, seed=5).read()

    async def main() -> tuple[str, str, str]:
        a = await collect(generator.generate(CHAT_PROMPT, max_tokens=20, seed=5))
        b = await generator.generate(CHAT_PROMPT, max_tokens=20, seed=5).aread()
        events = generator.generate(CHAT_PROMPT, max_tokens=20, seed=5).events()
        c = "".join([event.text async for event in events])
        return a, b, c

    assert asyncio.run(main()) == (expected, expected, expected)


def test_the_event_loop_runs_while_the_prompt_computes(slow_generator: Phi3Generator) -> None:
    """While `async for` waits for a long prompt (dozens of chunks on a worker thread), other
    tasks on the loop run: this one sees the consumer waiting and no token generated yet.
    An `__anext__` that computed on the loop's thread would return only after the prompt and
    its first token, so this task could not run in between. Events, not clocks: nothing
    here depends on how fast the machine is."""

    async def main() -> tuple[bool, str]:
        stream = slow_generator.generate(LONG_PROMPT, max_tokens=20, ignore_eos=True)
        waiting = asyncio.Event()

        async def consume() -> str:
            waiting.set()  # the first `__anext__` follows without yielding to the loop
            return await collect(stream)

        consumer = asyncio.create_task(consume())
        await waiting.wait()  # back on the loop once the consumer awaits its first piece
        in_flight = stream.generated_tokens == 0 and stream.finish_reason is None
        return in_flight, await consumer

    in_flight, text = asyncio.run(main())
    assert text
    assert in_flight, "the loop did not run while the prompt was computed"


def test_cancelling_the_task_cancels_the_generation(
    slow_generator: Phi3Generator, tokenizer_path: Path
) -> None:
    gen = Phi3Generator(slow_generator.model_path, tokenizer=tokenizer_path)

    async def main() -> TokenStream:
        stream = gen.generate(LONG_PROMPT, max_tokens=None, ignore_eos=True)
        consumer = asyncio.create_task(collect(stream))

        def first_chunk_in() -> None:
            while stream.prompt_tokens_per_second is None:
                time.sleep(0.001)

        await asyncio.to_thread(first_chunk_in)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        return stream

    stream = asyncio.run(main())
    stream.close()  # waits for the step the worker thread was running
    assert stream.finish_reason == "cancelled"
    assert stream.generated_tokens <= 1  # the prompt alone takes many chunks
    again = gen.generate(LONG_PROMPT, max_tokens=0)
    assert again.cached_tokens >= 64  # the computed prefix was kept


def test_concurrent_streams_on_one_loop_all_progress(gqa_generator: Phi3Generator) -> None:
    seeds = [1, 2, 3]
    expected = [
        gqa_generator.generate(CHAT_PROMPT, max_tokens=25, seed=s, ignore_eos=True).read()
        for s in seeds
    ]
    order: list[int] = []

    async def consume(i: int, stream: TokenStream) -> str:
        text = []
        async for piece in stream:
            order.append(i)
            text.append(piece)
        return "".join(text)

    async def main() -> list[str]:
        streams = [
            gqa_generator.generate(CHAT_PROMPT, max_tokens=25, seed=s, ignore_eos=True)
            for s in seeds
        ]
        return list(await asyncio.gather(*(consume(i, s) for i, s in enumerate(streams))))

    assert asyncio.run(main()) == expected
    first = {i: order.index(i) for i in range(3)}
    last = {i: len(order) - 1 - order[::-1].index(i) for i in range(3)}
    # Every stream had text before any other one finished: they ran together.
    assert all(first[i] < last[j] for i in range(3) for j in range(3) if i != j)
