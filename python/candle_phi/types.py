"""Types for annotating code that uses candle_phi."""

from __future__ import annotations

from typing import Literal, TypeAlias, TypedDict

Role: TypeAlias = Literal["system", "user", "assistant"]
"""Who speaks a chat message."""

FinishReason: TypeAlias = Literal["stop", "length"]
"""Why a stream ended: an end token, stop token or stop string; or ``max_tokens``."""


class ChatMessage(TypedDict):
    """One turn of a conversation, as ``chat`` and ``apply_chat_template`` take it."""

    role: Role
    content: str


__all__ = ["ChatMessage", "FinishReason", "Role"]
