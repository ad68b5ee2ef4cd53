"""The public surface: what `candle_phi` exports and how it presents itself."""

from __future__ import annotations

import inspect

import candle_phi
import pytest
from candle_phi import GenerationOptions, Phi3Generator
from candle_phi.types import ChatMessage

EXCEPTIONS = [
    "CandlePhiError",
    "ModelLoadError",
    "TokenizerError",
    "InvalidArgumentError",
    "ContextLengthError",
    "GenerationError",
]
NATIVE_CLASSES = [
    "Phi3Generator",
    "Tokenizer",
    "TokenStream",
    "TokenEvents",
    "TokenEvent",
    "TokenLogprob",
    "TopLogprob",
]


def test_everything_public_lives_in_candle_phi() -> None:
    for name in [*EXCEPTIONS, *NATIVE_CLASSES]:
        assert getattr(candle_phi, name).__module__ == "candle_phi", name
    assert sorted(candle_phi.__all__) == sorted(
        [
            *EXCEPTIONS,
            *NATIVE_CLASSES,
            "ChatMessage",
            "FinishReason",
            "GenerationOptions",
            "KvCacheType",
            "Role",
            "__version__",
        ]
    )


def test_exception_hierarchy() -> None:
    base = candle_phi.CandlePhiError
    for name in EXCEPTIONS[1:]:
        assert issubclass(getattr(candle_phi, name), base)
    assert issubclass(candle_phi.InvalidArgumentError, ValueError)
    assert issubclass(candle_phi.InvalidArgumentError, TypeError)
    assert issubclass(candle_phi.ContextLengthError, ValueError)
    assert issubclass(candle_phi.GenerationError, RuntimeError)


def test_generate_and_chat_share_one_set_of_options(generator: Phi3Generator) -> None:
    """`GenerationOptions` is the one definition: both methods take exactly its names."""
    values: GenerationOptions = {
        "max_tokens": 1,
        "temperature": 0.8,
        "top_p": 0.95,
        "top_k": 40,
        "min_p": 0.0,
        "seed": 1,
        "repeat_penalty": 1.1,
        "repeat_last_n": 64,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "logit_bias": None,
        "stop": None,
        "stop_token_ids": None,
        "ignore_eos": False,
        "logprobs": False,
        "top_logprobs": None,
    }
    assert set(values) == set(GenerationOptions.__annotations__)
    messages: list[ChatMessage] = [{"role": "user", "content": "hi"}]
    for name, value in values.items():
        one = {"max_tokens": 1, "seed": 1, name: value}
        assert generator.generate("hi", **one).read() == generator.generate("hi", **one).read()
        generator.chat(messages, **one).read()
    for call in (
        lambda: generator.generate("hi", maxtokens=1),
        lambda: generator.chat(messages, temp=0),
    ):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            call()
    for method in (Phi3Generator.generate, Phi3Generator.chat):
        assert "**options" in str(inspect.signature(method))


def test_constructor_signature_shows_real_defaults() -> None:
    sig = inspect.signature(Phi3Generator)
    defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not p.empty}
    assert defaults["prefix_cache_bytes"] == 4 << 30
    assert defaults["n_threads"] is None


def test_classes_are_final() -> None:
    for cls in (candle_phi.Phi3Generator, candle_phi.TokenStream):
        try:
            type("Sub", (cls,), {})
        except TypeError:
            continue
        raise AssertionError(f"{cls.__name__} can be subclassed")
