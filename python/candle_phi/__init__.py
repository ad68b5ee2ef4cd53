"""Run quantized Phi-3 GGUF models locally, on Hugging Face Candle.

>>> from candle_phi import Phi3Generator
>>> gen = Phi3Generator()  # microsoft/Phi-3-mini-4k-instruct-gguf, q4, via the HF cache
>>> for piece in gen.chat([{"role": "user", "content": "Hi!"}], max_tokens=50):
...     print(piece, end="", flush=True)
"""

from __future__ import annotations

from candle_phi._errors import (
    CandlePhiError,
    ContextLengthError,
    GenerationError,
    InvalidArgumentError,
    ModelLoadError,
    TokenizerError,
)
from candle_phi._native import Phi3Generator, TokenStream, __version__
from candle_phi.types import ChatMessage, FinishReason, Role

__all__ = [
    "CandlePhiError",
    "ChatMessage",
    "ContextLengthError",
    "FinishReason",
    "GenerationError",
    "InvalidArgumentError",
    "ModelLoadError",
    "Phi3Generator",
    "Role",
    "TokenStream",
    "TokenizerError",
    "__version__",
]
