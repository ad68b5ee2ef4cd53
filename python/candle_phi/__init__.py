"""Run quantized Phi-3 GGUF models locally, on Hugging Face Candle.

>>> from candle_phi import Phi3Generator
>>> gen = Phi3Generator()  # microsoft/Phi-3-mini-4k-instruct-gguf, q4, via the HF cache
>>> for piece in gen.chat([{"role": "user", "content": "Hi!"}], max_tokens=50):
...     print(piece, end="", flush=True)
"""

# The public names load on first use (PEP 562), so that `import candle_phi` runs no code but
# this file: `python -m candle_phi` then loads the native library inside the command line's
# Ctrl-C handling, not before it. Type checkers read the imports below.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from candle_phi._errors import (
        CandlePhiError,
        ContextLengthError,
        GenerationError,
        InvalidArgumentError,
        ModelLoadError,
        TokenizerError,
    )
    from candle_phi._native import (
        Phi3Generator,
        TokenEvent,
        TokenEvents,
        Tokenizer,
        TokenLogprob,
        TokenStream,
        TopLogprob,
        __version__,
    )
    from candle_phi.types import ChatMessage, FinishReason, GenerationOptions, KvCacheType, Role

__all__ = [
    "CandlePhiError",
    "ChatMessage",
    "ContextLengthError",
    "FinishReason",
    "GenerationError",
    "GenerationOptions",
    "InvalidArgumentError",
    "KvCacheType",
    "ModelLoadError",
    "Phi3Generator",
    "Role",
    "TokenEvent",
    "TokenEvents",
    "TokenLogprob",
    "TokenStream",
    "Tokenizer",
    "TokenizerError",
    "TopLogprob",
    "__version__",
]

_HOMES = {
    "CandlePhiError": "_errors",
    "ContextLengthError": "_errors",
    "GenerationError": "_errors",
    "InvalidArgumentError": "_errors",
    "ModelLoadError": "_errors",
    "TokenizerError": "_errors",
    "Phi3Generator": "_native",
    "TokenStream": "_native",
    "Tokenizer": "_native",
    "TokenEvent": "_native",
    "TokenEvents": "_native",
    "TokenLogprob": "_native",
    "TopLogprob": "_native",
    "__version__": "_native",
    "ChatMessage": "types",
    "FinishReason": "types",
    "GenerationOptions": "types",
    "KvCacheType": "types",
    "Role": "types",
}

if not TYPE_CHECKING:

    def __getattr__(name):
        home = _HOMES.get(name)
        if home is None:
            raise AttributeError(f"module 'candle_phi' has no attribute {name!r}")
        from importlib import import_module

        value = getattr(import_module(f"candle_phi.{home}"), name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
