"""What a client cannot do to the server: oversized or malformed bodies, values of any type,
too many requests, disconnecting mid-generation. Each gets OpenAI's error JSON (never a 500)
or, for a disconnect, its generation cancelled."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from candle_phi import Phi3Generator
from candle_phi.server import ServerSettings
from serving import EVENT_TIMEOUT_S, Served, serve

CHAT = "/v1/chat/completions"
FULL_RUN_STEPS = 3000  # the long requests' max_tokens
MESSAGES = [{"role": "user", "content": "hello"}]
# Values of every JSON type, and the edges of numbers, for every parameter.
ODD_VALUES: list[Any] = [
    None, True, -1, 0, 10**30, -(10**30), 1.5, float("nan"), float("inf"), "", "abc",
    [], [1, "a"], {}, {"a": 1}, {"1": "x"}, [[1]], "\u0000", 2**63,
]  # fmt: skip
PARAMETERS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "seed", "stop", "presence_penalty", "frequency_penalty", "repeat_penalty",
    "repeat_last_n", "logit_bias", "logprobs", "top_logprobs", "n", "stream", "stream_options",
    "ignore_eos", "response_format", "tools", "echo", "user",
]  # fmt: skip


def post(served: Served, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(served.url + path, content=content, timeout=EVENT_TIMEOUT_S, **kwargs)


def error_of(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize("param", PARAMETERS)
def test_any_value_of_any_parameter_is_answered_without_a_server_error(
    served: Served, param: str
) -> None:
    for value in ODD_VALUES:
        body = {"messages": MESSAGES, "max_tokens": 2, param: value}
        # json.dumps writes NaN and Infinity, which Python's json (and ours) reads back.
        response = post(served, CHAT, body)
        assert response.status_code in (200, 400), (param, value, response.text)
        if response.status_code == 400:
            error = error_of(response)
            assert error["type"] == "invalid_request_error"
            assert error["param"] is None or error["param"].split("[")[0].split(".")[0] in (
                param, "messages", "prompt", "max_tokens", "max_completion_tokens"
            ), (param, value, error)  # fmt: skip


def test_bad_values_name_their_parameter(served: Served) -> None:
    cases = {
        "temperature": "hot",
        "max_tokens": 1.5,
        "stop": [1],
        "logit_bias": {"x": 1},
        "top_p": 7,
        "seed": -5,
        "presence_penalty": 9,
    }
    for param, value in cases.items():
        response = post(served, CHAT, {"messages": MESSAGES, param: value})
        assert response.status_code == 400, (param, response.text)
        assert error_of(response)["param"] == param, response.text


def test_malformed_bodies_get_400(served: Served) -> None:
    for body in [b"", b"{", b"[]", b'"text"', b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000]:
        response = post(served, CHAT, body)
        assert response.status_code == 400, (body[:10], response.text)
        error_of(response)
    image = [{"role": "user", "content": [{"type": "image_url"}]}]
    for messages in [[], [1], [{"role": "user"}], image, "hello", {"role": "user"}]:
        assert post(served, CHAT, {"messages": messages}).status_code == 400, messages
    assert post(served, "/v1/completions", {"prompt": ["a", "b"]}).status_code == 400
    assert post(served, "/v1/completions", {"prompt": [1, 99999999]}).status_code == 400


def test_the_model_field_is_a_name_never_a_path(served: Served, tmp_path: Any) -> None:
    for name in ["/etc/passwd", str(served.generator.model_path), "../../x.gguf", "gpt-4o"]:
        response = post(served, CHAT, {"model": name, "messages": MESSAGES, "max_tokens": 2})
        assert response.status_code == 200
        assert response.json()["model"] == "tiny-phi3"


def test_oversized_bodies_get_413(generator: Phi3Generator) -> None:
    settings = ServerSettings(model_name="m", max_body_bytes=10_000)
    big = {"messages": [{"role": "user", "content": "x" * 20_000}]}
    with serve(generator, settings) as served:
        assert post(served, CHAT, big).status_code == 413
        # Without a Content-Length (chunked), the limit holds as the body arrives.
        chunks = iter([json.dumps(big).encode()[i : i + 1000] for i in range(0, 20_100, 1000)])
        response = httpx.post(served.url + CHAT, content=chunks, timeout=EVENT_TIMEOUT_S)
        assert response.status_code == 413
        assert error_of(response)["code"] == "request_too_large"
        assert post(served, CHAT, {"messages": MESSAGES, "max_tokens": 2}).status_code == 200


def test_caps_on_stop_strings_messages_and_max_tokens(generator: Phi3Generator) -> None:
    settings = ServerSettings(model_name="m", max_stop=4, max_messages=8, max_tokens=50)
    with serve(generator, settings) as served:
        too_many = post(served, CHAT, {"messages": MESSAGES, "stop": list("abcde")})
        assert too_many.status_code == 400 and error_of(too_many)["param"] == "stop"
        long = post(served, CHAT, {"messages": MESSAGES * 9})
        assert long.status_code == 400 and error_of(long)["param"] == "messages"
        most = post(served, CHAT, {"messages": MESSAGES, "max_tokens": 51})
        assert most.status_code == 400 and error_of(most)["param"] == "max_tokens"
        # Left out, max_tokens is the server's cap.
        capped = post(served, CHAT, {"messages": MESSAGES, "ignore_eos": True})
        assert capped.json()["usage"]["completion_tokens"] == 50


@contextmanager
def streaming(served: Served) -> Iterator[httpx.Response]:
    """A long streaming request whose first chunk has arrived: its generation is running.
    Leaving closes the connection; so would dropping the client or the line iterator (httpx
    closes the connection when either is collected), so both stay referenced here."""
    body = {"messages": MESSAGES, "max_tokens": FULL_RUN_STEPS, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=EVENT_TIMEOUT_S) as client:
        request = client.build_request("POST", served.url + CHAT, json=body)
        response = client.send(request, stream=True)
        assert response.status_code == 200
        lines = response.iter_lines()
        while not next(lines).startswith("data:"):
            pass
        yield response


def test_a_full_queue_gets_503_with_retry_after(slow_generator: Phi3Generator) -> None:
    settings = ServerSettings(model_name="m", max_concurrency=1, max_queue=0, retry_after_s=7)
    with serve(slow_generator, settings) as served:
        with streaming(served):
            busy = post(served, CHAT, {"messages": MESSAGES, "max_tokens": 2})
            assert busy.status_code == 503
            assert busy.headers["retry-after"] == "7"
            assert error_of(busy)["code"] == "server_busy"
        served.wait_idle()
        assert post(served, CHAT, {"messages": MESSAGES, "max_tokens": 2}).status_code == 200


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(served_slow: Served) -> None:
    gen = served_slow.generator
    before, steps = gen.active_streams, gen.pass_counts[1]
    with streaming(served_slow):
        assert served_slow.runner.live == 1
        assert gen.active_streams == before + 1
    served_slow.wait_idle()
    assert gen.active_streams == before
    # Run to its end, it would have taken 3000 steps.
    assert gen.pass_counts[1] - steps < FULL_RUN_STEPS // 2


def test_a_client_that_disconnects_before_a_whole_reply_cancels_it(served_slow: Served) -> None:
    gen = served_slow.generator
    before, steps = gen.active_streams, gen.pass_counts[1]
    request = {"messages": MESSAGES, "max_tokens": FULL_RUN_STEPS, "ignore_eos": True}
    body = json.dumps(request).encode()
    with socket.create_connection(("127.0.0.1", int(served_slow.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert served_slow.runner.wait_for(lambda r: r.live == 1, EVENT_TIMEOUT_S)
    served_slow.wait_idle()
    assert gen.active_streams == before
    assert gen.pass_counts[1] - steps < FULL_RUN_STEPS // 2
