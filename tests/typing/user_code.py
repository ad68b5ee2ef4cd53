"""Typical user code, checked with `mypy --strict` by tests/test_typing.py (never run)."""

from __future__ import annotations

from pathlib import Path

from candle_phi import (
    CandlePhiError,
    ChatMessage,
    ContextLengthError,
    FinishReason,
    Phi3Generator,
    TokenStream,
)


def load(path: Path | None) -> Phi3Generator:
    if path is None:
        return Phi3Generator(progress=True)
    return Phi3Generator(path, tokenizer=path.with_name("tokenizer.json"))


def haiku(gen: Phi3Generator) -> tuple[str, FinishReason | None]:
    stream: TokenStream = gen.generate(
        "<|user|>\nWrite a haiku<|end|>\n<|assistant|>\n",
        max_tokens=100,
        temperature=0.7,
        top_p=0.9,
        top_k=None,
        seed=42,
        stop=["\n\n"],
    )
    text = "".join(piece for piece in stream)
    return text, stream.finish_reason


def converse(gen: Phi3Generator, question: str) -> str:
    history: list[ChatMessage] = [{"role": "system", "content": "Be brief."}]
    history.append({"role": "user", "content": question})
    try:
        reply = gen.chat(history, max_tokens=None, stop="###").read()
    except ContextLengthError:
        return ""
    except CandlePhiError as err:
        return str(err)
    history.append({"role": "assistant", "content": reply})
    prompt = gen.apply_chat_template(history, add_generation_prompt=False)
    ids: list[int] = gen.tokenize(prompt)
    speed: float | None = gen.chat(history).generation_tokens_per_second
    return f"{reply} {len(ids)} {speed} {gen.context_length} {gen.end_token_ids}"
