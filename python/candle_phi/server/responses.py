"""OpenAI's response and chunk shapes for chat completions and completions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from candle_phi import Phi3Generator, TokenLogprob, TokenStream
from candle_phi.server.requests import Job


class Reply:
    """What one request has produced so far, and how to write it in OpenAI's terms."""

    def __init__(self, job: Job, model: str, generator: Phi3Generator) -> None:
        self.job = job
        self.model = model
        self.generator = generator
        prefix = "chatcmpl" if job.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text: list[str] = []  # a whole reply's pieces (streamed ones are not kept)
        self.streamed_chars = 0  # where the next streamed piece starts: its text_offset
        self.logprobs: list[TokenLogprob] = []

    def finish_reason(self, stream: TokenStream) -> str:
        # "cancelled" only reaches a client at shutdown; OpenAI has no word for it.
        return "length" if stream.finish_reason == "length" else "stop"

    def usage(self, stream: TokenStream) -> dict[str, Any]:
        return {
            "prompt_tokens": stream.prompt_tokens,
            "completion_tokens": stream.generated_tokens,
            "total_tokens": stream.prompt_tokens + stream.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stream.cached_tokens},
        }

    def _token(self, token_id: int) -> str:
        return self.generator.detokenize([token_id])

    def _chat_logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        def one(token_id: int, logprob: float) -> dict[str, Any]:
            token = self._token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {
            "content": [
                {
                    **one(e.token_id, e.logprob),
                    "top_logprobs": [one(t.token_id, t.logprob) for t in e.top_logprobs],
                }
                for e in entries
            ]
        }

    def _completion_logprobs(self, entries: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens = [self._token(e.token_id) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [
                {self._token(t.token_id): t.logprob for t in e.top_logprobs} for e in entries
            ],
            "text_offset": offsets,
        }

    def _logprobs(self, entries: Sequence[TokenLogprob] | None, offset: int) -> Any:
        if not self.job.logprobs:
            return None
        entries = entries or []
        if self.job.kind == "chat":
            return self._chat_logprobs(entries)
        return self._completion_logprobs(entries, offset)

    def _envelope(self, choices: list[dict[str, Any]], *, chunk: bool) -> dict[str, Any]:
        if self.job.kind == "chat":
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        body: dict[str, Any] = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if chunk and self.job.include_usage:
            body["usage"] = None  # as OpenAI: only the last chunk carries it
        return body

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role and no text."""
        if self.job.kind != "chat":
            return None
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return self._envelope([choice], chunk=True)

    def chunk(self, text: str, entries: Sequence[TokenLogprob] | None) -> dict[str, Any]:
        logprobs = self._logprobs(entries, self.streamed_chars)
        self.streamed_chars += len(text)
        if self.job.kind == "chat":
            choice = {"index": 0, "delta": {"content": text}, "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs}
        return self._envelope([{**choice, "finish_reason": None}], chunk=True)

    def last_chunk(self, stream: TokenStream) -> dict[str, Any]:
        if self.job.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": {}, "logprobs": None}
        else:
            choice = {"index": 0, "text": "", "logprobs": None}
        choice["finish_reason"] = self.finish_reason(stream)
        return self._envelope([choice], chunk=True)

    def usage_chunk(self, stream: TokenStream) -> dict[str, Any]:
        return {**self._envelope([], chunk=True), "usage": self.usage(stream)}

    def add(self, text: str, entries: Sequence[TokenLogprob] | None) -> None:
        self.text.append(text)
        self.logprobs.extend(entries or [])

    def whole(self, stream: TokenStream) -> dict[str, Any]:
        """The non-streaming response."""
        text = "".join(self.text)
        logprobs = self._logprobs(self.logprobs, 0)
        if self.job.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": logprobs,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs}
        choice["finish_reason"] = self.finish_reason(stream)
        return {**self._envelope([choice], chunk=False), "usage": self.usage(stream)}
