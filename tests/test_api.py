"""The public surface: what `candle_phi` exports and how it presents itself."""

from __future__ import annotations

import inspect

import candle_phi

EXCEPTIONS = [
    "CandlePhiError",
    "ModelLoadError",
    "TokenizerError",
    "InvalidArgumentError",
    "ContextLengthError",
    "GenerationError",
]


def test_everything_public_lives_in_candle_phi() -> None:
    for name in [*EXCEPTIONS, "Phi3Generator", "TokenStream"]:
        assert getattr(candle_phi, name).__module__ == "candle_phi", name
    assert sorted(candle_phi.__all__) == sorted(
        [
            *EXCEPTIONS,
            "Phi3Generator",
            "TokenStream",
            "ChatMessage",
            "FinishReason",
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


def test_signatures_show_real_defaults() -> None:
    sig = inspect.signature(candle_phi.Phi3Generator.generate)
    defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not p.empty}
    assert defaults == {
        "max_tokens": 256,
        "temperature": 0.8,
        "top_p": 0.95,
        "top_k": 40,
        "seed": None,
        "repeat_penalty": 1.1,
        "repeat_last_n": 64,
        "stop": None,
        "stop_token_ids": None,
        "ignore_eos": False,
    }
    assert all(
        p.kind is p.KEYWORD_ONLY for n, p in sig.parameters.items() if n not in ("self", "prompt")
    )


def test_classes_are_final() -> None:
    for cls in (candle_phi.Phi3Generator, candle_phi.TokenStream):
        try:
            type("Sub", (cls,), {})
        except TypeError:
            continue
        raise AssertionError(f"{cls.__name__} can be subclassed")
