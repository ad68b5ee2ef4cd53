"""What one ``serve`` process allows: the limits a client cannot raise."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    """Limits and identity of a server; every field has a safe default.

    Attributes:
        model_name: The id ``/v1/models`` lists and responses carry. Requests may name any
            model: the field is echoed as this name and never read as a path.
        api_key: When set, every endpoint but ``/health`` and the chat page needs
            ``Authorization: Bearer <api_key>``.
        max_concurrency: Generations running at once; they are batched into shared passes.
        max_queue: Requests waiting for a free slot; more are refused with 503 and
            ``Retry-After``.
        max_body_bytes: Largest request body; larger ones get 413.
        max_tokens: Most tokens one request may generate; None means the context length.
        max_stop: Most stop strings in one request.
        max_messages: Most messages in one chat request.
        retry_after_s: The ``Retry-After`` sent with 503.
    """

    model_name: str = "phi3"
    api_key: str | None = None
    max_concurrency: int = 8
    max_queue: int = 64
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens: int | None = None
    max_stop: int = 16
    max_messages: int = 1024
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_concurrency", "max_body_bytes", "max_stop", "max_messages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be at least 0, not {self.max_queue}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1 or None, not {self.max_tokens}")
        if self.api_key == "":
            raise ValueError("api_key must not be empty; leave it unset to serve without one")
