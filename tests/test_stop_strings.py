"""Stop strings end the text just before them and never leak, even across tokens."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from candle_phi import InvalidArgumentError, Phi3Generator
from conftest import CHAT_PROMPT, END

Scripted = Callable[[list[int]], Phi3Generator]


@pytest.fixture()
def hello_world(scripted: Scripted, token_id: Callable[[str], int]) -> Phi3Generator:
    # Greedy output: "Hello world!###" in the tokens "Hello", " world", "!", "###", then <|end|>.
    return scripted([token_id(t) for t in ("▁Hello", "▁world", "!", "###")] + [END])


def pieces(gen: Phi3Generator, **kwargs: object) -> list[str]:
    return list(gen.generate(CHAT_PROMPT, temperature=0, **kwargs))  # type: ignore[arg-type]


def test_without_stop_strings(hello_world: Phi3Generator) -> None:
    assert pieces(hello_world) == ["Hello", " world", "!", "###"]


def test_stop_spanning_tokens_never_leaks(hello_world: Phi3Generator) -> None:
    stream = hello_world.generate(CHAT_PROMPT, temperature=0, stop=["o w"])
    out = list(stream)
    assert out == ["Hell"]
    assert stream.finish_reason == "stop"


def test_held_text_is_released_when_the_match_fails(hello_world: Phi3Generator) -> None:
    assert pieces(hello_world, stop=["o!"]) == ["Hell", "o world", "!", "###"]


def test_stop_at_the_very_end(hello_world: Phi3Generator) -> None:
    assert "".join(pieces(hello_world, stop="###")) == "Hello world!"
    assert "".join(pieces(hello_world, stop=["#"])) == "Hello world!"


def test_unmatched_prefix_is_released_at_the_end(hello_world: Phi3Generator) -> None:
    # "###" could still grow into "####": held back until generation ends, then released.
    out = pieces(hello_world, stop=["####"])
    assert out[-1].endswith("###") and "".join(out) == "Hello world!###"


def test_stop_when_max_tokens_ends_in_a_partial_match(hello_world: Phi3Generator) -> None:
    stream = hello_world.generate(CHAT_PROMPT, temperature=0, max_tokens=2, stop=["d!"])
    assert "".join(stream) == "Hello world"
    assert stream.finish_reason == "length"


def test_earliest_stop_wins(hello_world: Phi3Generator) -> None:
    assert "".join(pieces(hello_world, stop=["!", "wor"])) == "Hello "


def test_streaming_and_read_give_the_same_text(generator: Phi3Generator) -> None:
    for stop in (None, ["\n"], ["의", "가"], ["a", "e"]):
        kwargs = {"max_tokens": 50, "seed": 3, "temperature": 1.2, "stop": stop}
        streamed = "".join(generator.generate(CHAT_PROMPT, **kwargs))  # type: ignore[arg-type]
        read = generator.generate(CHAT_PROMPT, **kwargs).read()  # type: ignore[arg-type]
        assert streamed == read
        for s in stop or []:
            assert s not in streamed


def test_empty_or_wrong_stop_is_rejected(generator: Phi3Generator) -> None:
    with pytest.raises(InvalidArgumentError, match="stop"):
        generator.generate(CHAT_PROMPT, stop=[""])
    with pytest.raises(InvalidArgumentError, match="stop"):
        generator.generate(CHAT_PROMPT, stop=[1, 2])  # type: ignore[list-item]
