"""The server through the real `openai` client: same text as the Python API, OpenAI's shapes
and exceptions, concurrent requests kept apart."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from candle_phi import Phi3Generator, TokenStream
from candle_phi.server import ServerSettings
from serving import Served, serve

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Write a haiku about ice hockey"},
]
# With temperature 0 only the penalties matter; the server's defaults are OpenAI's (none).
CHAT_PROMPT = "<|user|>\nWrite a haiku about ice hockey<|end|>\n<|assistant|>"
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}


def client(served: Served, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, **kwargs)


def python_chat(gen: Phi3Generator, messages: Any, max_tokens: int) -> tuple[str, TokenStream]:
    stream = gen.chat(messages, max_tokens=max_tokens, **GREEDY)  # type: ignore[arg-type]
    return stream.read(), stream


def test_chat_text_equals_the_python_api(served: Served) -> None:
    expected, alone = python_chat(served.generator, MESSAGES, 20)
    response = client(served).chat.completions.create(
        model="tiny-phi3", messages=MESSAGES, max_tokens=20, temperature=0
    )
    choice = response.choices[0]
    assert choice.message.content == expected
    assert choice.message.role == "assistant"
    assert choice.finish_reason == alone.finish_reason
    assert response.model == "tiny-phi3"
    assert response.usage is not None
    assert response.usage.completion_tokens == alone.generated_tokens
    assert response.usage.prompt_tokens == alone.prompt_tokens
    # The same conversation again: its prompt's state is reused, and usage says so.
    assert response.usage.prompt_tokens_details is not None
    assert response.usage.prompt_tokens_details.cached_tokens > 0


def test_chat_streaming_text_equals_the_python_api(served: Served) -> None:
    expected, alone = python_chat(served.generator, MESSAGES, 20)
    chunks = list(
        client(served).chat.completions.create(
            model="tiny-phi3",
            messages=MESSAGES,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == alone.finish_reason
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == alone.generated_tokens
    assert usage.prompt_tokens == alone.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_equal_the_python_api_with_and_without_streaming(served: Served) -> None:
    stream = served.generator.generate(CHAT_PROMPT, max_tokens=16, **GREEDY)  # type: ignore[arg-type]
    expected = stream.read()
    api = client(served)
    whole = api.completions.create(model="x", prompt=CHAT_PROMPT, max_tokens=16, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == stream.finish_reason
    pieces = api.completions.create(
        model="x", prompt=CHAT_PROMPT, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == expected
    ids = api.completions.create(
        model="x", prompt=served.generator.tokenize(CHAT_PROMPT), max_tokens=16, temperature=0
    )
    assert ids.choices[0].text == expected


def test_seeded_sampling_equals_the_python_api(served: Served) -> None:
    options = {"temperature": 0.9, "top_p": 0.8, "seed": 1234}
    stream = served.generator.chat(
        MESSAGES, max_tokens=24, repeat_penalty=1.0, top_k=None, **options
    )  # type: ignore[arg-type]
    expected = stream.read()
    response = client(served).chat.completions.create(
        model="tiny-phi3",
        messages=MESSAGES,
        max_tokens=24,
        **options,  # type: ignore[arg-type]
    )
    assert response.choices[0].message.content == expected


def test_logprobs_equal_the_python_api(served: Served) -> None:
    stream = served.generator.chat(MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)  # type: ignore[arg-type]
    stream.read()
    assert stream.logprobs is not None
    response = client(served).chat.completions.create(
        model="tiny-phi3",
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = response.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert [round(c.logprob, 5) for c in content] == [round(e.logprob, 5) for e in stream.logprobs]
    for got, want in zip(content, stream.logprobs, strict=True):
        assert [t.logprob for t in got.top_logprobs] == pytest.approx(
            [t.logprob for t in want.top_logprobs], abs=1e-5
        )
        assert got.token == served.generator.detokenize([want.token_id])


def test_async_client_streams_and_not(served: Served) -> None:
    expected, _ = python_chat(served.generator, MESSAGES, 12)

    async def main() -> tuple[str, str]:
        api = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        whole = await api.chat.completions.create(
            model="tiny-phi3", messages=MESSAGES, max_tokens=12, temperature=0
        )
        parts = []
        async for chunk in await api.chat.completions.create(
            model="tiny-phi3", messages=MESSAGES, max_tokens=12, temperature=0, stream=True
        ):
            parts.append(chunk.choices[0].delta.content or "")
        await api.close()
        return whole.choices[0].message.content or "", "".join(parts)

    assert asyncio.run(main()) == (expected, expected)


def test_concurrent_requests_get_their_own_texts(served: Served) -> None:
    prompts = [f"Tell me about the number {i}" for i in range(8)]
    expected = [
        python_chat(served.generator, [{"role": "user", "content": p}], 16)[0] for p in prompts
    ]
    api = client(served)

    def ask(i: int) -> str:
        messages: Any = [{"role": "user", "content": prompts[i]}]
        if i % 2:
            response = api.chat.completions.create(
                model="m", messages=messages, max_tokens=16, temperature=0
            )
            return response.choices[0].message.content or ""
        chunks = api.chat.completions.create(
            model="m", messages=messages, max_tokens=16, temperature=0, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == expected


def test_sse_chunks_are_well_formed(served: Served) -> None:
    body = {"messages": MESSAGES, "max_tokens": 8, "stream": True, "temperature": 0}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [
            line.removeprefix("data: ")
            for line in response.iter_lines()
            if line.startswith("data: ")
        ]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 for c in chunks)
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[:-1] == [None] * (len(chunks) - 1) and reasons[-1] in ("stop", "length")


def test_errors_are_openai_exceptions_with_the_right_status(served: Served) -> None:
    api = client(served)
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model="m", messages=MESSAGES, temperature=-1)
    assert bad.value.status_code == 400
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as long:
        api.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10**6)
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as roles:
        api.chat.completions.create(model="m", messages=[{"role": "tool", "content": "x"}])  # type: ignore[list-item]
    assert roles.value.body["param"] == "messages[0].role"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        api.chat.completions.create(model="m", messages=MESSAGES, n=2)
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("someone-else")
    assert [m.id for m in api.models.list()] == ["tiny-phi3"]


def test_the_api_key_is_enforced(generator: Phi3Generator) -> None:
    settings = ServerSettings(model_name="tiny-phi3", api_key="s3cret")
    with serve(generator, settings) as served:
        for key in ("wrong", "s3cre", "s3cret!", ""):
            with pytest.raises(openai.AuthenticationError) as denied:
                client(served).with_options(api_key=key).models.list()
            assert denied.value.status_code == 401
        assert httpx.post(served.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        assert httpx.get(served.url + "/health").status_code == 200
        keyed = client(served).with_options(api_key="s3cret")
        response = keyed.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
        assert response.usage is not None and response.usage.completion_tokens > 0
