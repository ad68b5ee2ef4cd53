"""OpenAI request bodies, checked and turned into the engine's arguments.

Types and the server's caps are checked here, naming the parameter; value ranges are the
engine's to check (its errors name the option too). Parameters left out take OpenAI's
defaults (temperature 1, top_p 1, no top-k, no repeat penalty), not the library's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.requests import Request

from candle_phi.server.errors import APIError, bad_request
from candle_phi.server.settings import ServerSettings
from candle_phi.types import ChatMessage, GenerationOptions

# OpenAI's "developer" role is its newer name for the system prompt.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_CHARS = 1000
MAX_MODEL_NAME_CHARS = 256


@dataclass
class Job:
    """One request, as the engine will run it."""

    kind: Literal["chat", "completion"]
    options: GenerationOptions
    prompt: str | list[int] | None = None
    messages: list[ChatMessage] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    # Whether the client gave max_tokens; if not, the server's cap applies where it fits.
    max_tokens_given: bool = False

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, never reading more than ``limit`` bytes."""
    too_large = APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes",
        code="request_too_large",
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is not None and not _is_number(value):
        raise bad_request(name, f"{name} must be a number, not {json.dumps(value)[:50]}")
    return None if value is None else float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and not _is_int(value):
        raise bad_request(name, f"{name} must be an integer, not {json.dumps(value)[:50]}")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(name, f"{name} must be true or false, not {json.dumps(value)[:50]}")
    return bool(value)


def _unsupported(body: dict[str, Any]) -> None:
    """Refuse what we cannot do rather than silently doing something else."""
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("n", "n must be 1: this server returns one choice per request")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise bad_request("best_of", "best_of must be 1")
    if body.get("echo"):
        raise bad_request("echo", "echo is not supported")
    if body.get("suffix"):
        raise bad_request("suffix", "suffix (insertion) is not supported")
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad_request(name, f"{name} (function calling) is not supported")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad_request("response_format", "only response_format {'type': 'text'} is supported")


def _model(body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or len(model) > MAX_MODEL_NAME_CHARS):
        raise bad_request("model", "model must be a model name (a string)")


def _stop(body: dict[str, Any], settings: ServerSettings) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop", "stop must be a string or a list of strings")
    if len(stops) > settings.max_stop:
        raise bad_request(
            "stop", f"stop has {len(stops)} strings; this server takes at most {settings.max_stop}"
        )
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request("stop", f"a stop string is longer than {MAX_STOP_CHARS} characters")
    return stops


def _logit_bias(body: dict[str, Any]) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise bad_request("logit_bias", "logit_bias must map token ids to numbers")
    out: dict[int, float] = {}
    for key, value in bias.items():
        # JSON object keys are strings: OpenAI's are token ids written as decimals.
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 10):
            raise bad_request("logit_bias", f"logit_bias key {key!r} is not a token id")
        if not _is_number(value):
            raise bad_request("logit_bias", f"logit_bias[{key}] must be a number")
        out[int(key)] = float(value)
    return out


def _options(body: dict[str, Any], settings: ServerSettings, job: Job) -> None:
    options = job.options
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _integer(body, name)
    if max_tokens is not None:
        if settings.max_tokens is not None and max_tokens > settings.max_tokens:
            raise bad_request(
                name, f"{name} is {max_tokens}; this server allows at most {settings.max_tokens}"
            )
        job.max_tokens_given = True
    options["max_tokens"] = max_tokens if max_tokens is not None else settings.max_tokens

    temperature = _number(body, "temperature")
    options["temperature"] = 1.0 if temperature is None else temperature
    top_p = _number(body, "top_p")
    options["top_p"] = None if top_p is None else top_p
    top_k = _integer(body, "top_k")
    options["top_k"] = None if top_k is None or top_k == 0 else top_k  # llama.cpp: 0 is off
    for key in ("min_p", "presence_penalty", "frequency_penalty"):
        value = _number(body, key)
        if value is not None:
            options[key] = value
    repeat_penalty = _number(body, "repeat_penalty")
    options["repeat_penalty"] = 1.0 if repeat_penalty is None else repeat_penalty
    repeat_last_n = _integer(body, "repeat_last_n")
    if repeat_last_n is not None:
        options["repeat_last_n"] = repeat_last_n
    seed = _integer(body, "seed")
    options["seed"] = None if seed == -1 else seed  # llama.cpp's -1: a random seed
    options["stop"] = _stop(body, settings)
    options["logit_bias"] = _logit_bias(body)
    options["ignore_eos"] = _flag(body, "ignore_eos")


def _logprobs(body: dict[str, Any], job: Job) -> None:
    if job.kind == "chat":
        wanted = _flag(body, "logprobs")
        top = _integer(body, "top_logprobs")
        if top is not None and not wanted:
            raise bad_request("top_logprobs", "top_logprobs needs logprobs: true")
    else:
        # The legacy completions API: logprobs is the number of top tokens, or null.
        top = _integer(body, "logprobs")
        wanted = top is not None
    job.logprobs = wanted
    if wanted:
        job.options["logprobs"] = True
        job.options["top_logprobs"] = top or 0


def _streaming(body: dict[str, Any], job: Job) -> None:
    job.stream = _flag(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise bad_request("stream_options", "stream_options must be an object")
        job.include_usage = _flag(stream_options, "include_usage")


def _content(index: int, message: dict[str, Any]) -> str:
    content = message.get("content")
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant" and not message.get("tool_calls"):
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request(where, f"{where} may hold only text parts")
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(where, f"{where} has a text part without a string 'text'")
            texts.append(text)
        return "".join(texts)
    raise bad_request(where, f"{where} must be a string or a list of text parts")


def _messages(body: dict[str, Any], settings: ServerSettings) -> list[ChatMessage]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "messages must be a non-empty list of messages")
    if len(messages) > settings.max_messages:
        raise bad_request(
            "messages",
            f"messages has {len(messages)} entries; this server takes at most "
            f"{settings.max_messages}",
        )
    out: list[ChatMessage] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}]", f"messages[{i}] must be an object")
        role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise bad_request(
                f"messages[{i}].role",
                f"messages[{i}].role must be one of {', '.join(ROLES)}, "
                f"not {json.dumps(message.get('role'))[:50]}",
            )
        out.append({"role": role, "content": _content(i, message)})  # type: ignore[typeddict-item]
    return out


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    # One prompt, written as text, a list of one text, token ids, or a list of one such list.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request("prompt", "one prompt per request: send several requests instead")
    raise bad_request("prompt", "prompt must be a string or a non-empty list of token ids")


def parse(
    body: dict[str, Any], kind: Literal["chat", "completion"], settings: ServerSettings
) -> Job:
    """The job of a ``/v1/chat/completions`` or ``/v1/completions`` body."""
    _model(body)
    _unsupported(body)
    job = Job(kind=kind, options={})
    if kind == "chat":
        job.messages = _messages(body, settings)
    else:
        job.prompt = _prompt(body)
    _options(body, settings, job)
    _logprobs(body, job)
    _streaming(body, job)
    return job
