"""Types for annotating code that uses candle_phi."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, TypeAlias, TypedDict

Role: TypeAlias = Literal["system", "user", "assistant"]
"""Who speaks a chat message."""

KvCacheType: TypeAlias = Literal["f16", "q8_0", "f32"]
"""How a generator keeps keys and values: f16 (the default), 8-bit blocks, or f32."""

FinishReason: TypeAlias = Literal["stop", "length", "cancelled"]
"""Why a stream ended: an end token, stop token or stop string; ``max_tokens``; or
``cancel()`` / ``close()``."""


class ChatMessage(TypedDict):
    """One turn of a conversation, as ``chat`` and ``apply_chat_template`` take it."""

    role: Role
    content: str


class GenerationOptions(TypedDict, total=False):
    """The keyword options of ``generate`` and ``chat``: one definition for both.

    Annotate your own option sets with it (``opts: GenerationOptions = {...}``, then
    ``gen.chat(messages, **opts)``). An unknown name raises TypeError; a bad value raises
    InvalidArgumentError naming the option. Sampling applies, in order: ``repeat_penalty``,
    ``presence_penalty`` and ``frequency_penalty``, ``logit_bias``, ``min_p``, then
    ``temperature``, ``top_k`` and ``top_p``.
    """

    max_tokens: int | None
    """Most tokens to generate (default 256); None fills the rest of the context."""
    temperature: float
    """Default 0.8; 0 means greedy (argmax) decoding."""
    top_p: float | None
    """Nucleus sampling mass in (0, 1] (default 0.95); None or 1 keeps every token."""
    top_k: int | None
    """Sample among the ``top_k`` most likely tokens (default 40); None keeps every token."""
    min_p: float
    """Drop tokens less likely than ``min_p`` times the most likely one, measured before
    temperature as llama.cpp does (default 0: off)."""
    seed: int | None
    """The same seed always gives the same text; None (default) draws a fresh seed."""
    repeat_penalty: float
    """llama.cpp's penalty (> 0, default 1.1, 1 is off) on the last ``repeat_last_n``
    generated tokens: positive logits are divided by it, negative ones multiplied."""
    repeat_last_n: int
    """How many of the last generated tokens ``repeat_penalty`` looks at (default 64)."""
    presence_penalty: float
    """OpenAI's, from -2 to 2 (default 0): subtracted once from the logit of every token
    generated so far."""
    frequency_penalty: float
    """OpenAI's, from -2 to 2 (default 0): subtracted from a token's logit once per time it
    was generated."""
    logit_bias: Mapping[int, float] | None
    """Token id to a bias from -100 to 100 added to its logit; -100 bans the token."""
    stop: str | Sequence[str] | None
    """Strings that end generation. The text ends just before the first one, which is never
    yielded, not even in part."""
    stop_token_ids: Sequence[int] | None
    """Token ids that end generation besides the model's end tokens."""
    ignore_eos: bool
    """Generate past the model's end tokens (for benchmarks; default False)."""
    logprobs: bool
    """Report each generated token's log-probability (``TokenStream.logprobs``, events):
    the log-softmax of the raw logits, before temperature, penalties and filters."""
    top_logprobs: int | None
    """With ``logprobs``, also the 0 to 20 most likely tokens at each position."""


__all__ = ["ChatMessage", "FinishReason", "GenerationOptions", "KvCacheType", "Role"]
