"""`chat(..., truncate=True)`: a conversation too long for the context loses its oldest
turns, as few as needed, keeping system messages and the last message; without it the
clear ContextLengthError stays."""

from __future__ import annotations

import pytest
from candle_phi import ContextLengthError, Phi3Generator
from candle_phi.types import ChatMessage

MAX_TOKENS = 64


def conversation(turns: int) -> list[ChatMessage]:
    messages: list[ChatMessage] = [{"role": "system", "content": "System rules stay."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Question number {i}: " + "word " * 20})
        messages.append({"role": "assistant", "content": f"Answer number {i}: " + "reply " * 20})
    messages.append({"role": "user", "content": "The last question."})
    return messages


def prompt_length(gen: Phi3Generator, messages: list[ChatMessage]) -> int:
    text = gen.apply_chat_template(messages)
    return len(gen.tokenize(text))


def test_oldest_turns_go_first_and_no_more_than_needed(generator: Phi3Generator) -> None:
    messages = conversation(30)
    assert prompt_length(generator, messages) + MAX_TOKENS > generator.context_length
    with pytest.raises(ContextLengthError, match="context length"):
        generator.chat(messages, max_tokens=MAX_TOKENS)

    stream = generator.chat(messages, max_tokens=MAX_TOKENS, truncate=True, temperature=0)
    dropped = stream.dropped_messages
    assert dropped > 0 and dropped % 2 == 0  # whole user/assistant turns
    kept = [messages[0], *messages[1 + dropped :]]
    # The stream's prompt is exactly the kept conversation's, and it fits...
    expected_ids = generator.tokenize(generator.apply_chat_template(kept))
    assert stream.prompt_token_ids == expected_ids
    assert len(expected_ids) + MAX_TOKENS <= generator.context_length
    # ...while keeping one more turn would not.
    one_more = [messages[0], *messages[1 + dropped - 2 :]]
    assert prompt_length(generator, one_more) + MAX_TOKENS > generator.context_length
    text = generator.detokenize(stream.prompt_token_ids)
    assert "System rules stay." in text and "The last question." in text
    assert "Question number 0:" not in text
    assert stream.read() == generator.chat(kept, max_tokens=MAX_TOKENS, temperature=0).read()


def test_a_fitting_conversation_is_untouched(generator: Phi3Generator) -> None:
    stream = generator.chat(conversation(2), max_tokens=MAX_TOKENS, truncate=True)
    assert stream.dropped_messages == 0
    assert stream.prompt_tokens == prompt_length(generator, conversation(2))


def test_a_last_message_too_long_still_raises(generator: Phi3Generator) -> None:
    messages: list[ChatMessage] = [
        *conversation(3)[:-1],
        {"role": "user", "content": "word " * generator.context_length},
    ]
    with pytest.raises(ContextLengthError, match="context length"):
        generator.chat(messages, max_tokens=MAX_TOKENS, truncate=True)


def test_the_kept_conversation_starts_with_a_user_turn(generator: Phi3Generator) -> None:
    # An assistant message first among the non-system ones: it goes with the first cut.
    messages: list[ChatMessage] = [
        {"role": "assistant", "content": "Hello! " * 40},
        *conversation(30)[1:],
    ]
    stream = generator.chat(messages, max_tokens=MAX_TOKENS, truncate=True)
    kept = messages[stream.dropped_messages :]
    assert kept[0]["role"] == "user"
    with pytest.raises(Exception, match="truncate"):
        generator.chat(messages, truncate="yes")  # type: ignore[arg-type]
