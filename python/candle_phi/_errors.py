"""The exceptions candle_phi raises. The native module raises these very classes."""

from __future__ import annotations


class CandlePhiError(Exception):
    """Base class of every error candle_phi raises on purpose."""


class ModelLoadError(CandlePhiError):
    """The model file is missing, unreadable, not a valid phi3 GGUF, or cannot be fetched."""


class TokenizerError(CandlePhiError):
    """The tokenizer file is missing, invalid, does not match the model, or fails to encode."""


class InvalidArgumentError(CandlePhiError, ValueError, TypeError):
    """An argument has a wrong value or type; the message names the parameter and the value."""


class ContextLengthError(CandlePhiError, ValueError):
    """The prompt plus ``max_tokens`` does not fit in the model's context window."""


class GenerationError(CandlePhiError, RuntimeError):
    """The model failed while computing; the stream cannot continue."""


for _cls in (
    CandlePhiError,
    ModelLoadError,
    TokenizerError,
    InvalidArgumentError,
    ContextLengthError,
    GenerationError,
):
    # Users import these from `candle_phi`; show them there in tracebacks and reprs.
    _cls.__module__ = "candle_phi"
del _cls
