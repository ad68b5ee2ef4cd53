"""Chat formats and end tokens of the other Phi models, taken from the GGUF's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import phi3_fixtures as fx
import pytest
from candle_phi import ChatMessage, Phi3Generator
from conftest import TINY_CONFIG

# The templates as published in the models' tokenizer_config.json / GGUF metadata.
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + "
    "'<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + "
    "message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + "
    "'<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' "
    "+ message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
IM_START, IM_SEP, IM_END = 32011, 32012, 32013

MESSAGES: list[ChatMessage] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
]


def test_phi4_mini_template(tmp_path: Path, tokenizer_path: Path) -> None:
    path = tmp_path / "phi4-mini-like.gguf"
    fx.write_phi3_gguf(path, TINY_CONFIG, chat_template=PHI4_MINI_TEMPLATE)
    gen = Phi3Generator(path, tokenizer=tokenizer_path)
    assert gen.apply_chat_template(MESSAGES) == (
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"
    )
    assert gen.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith(
        "<|end|><|endoftext|>"
    )
    ids = gen.chat(MESSAGES, max_tokens=0).prompt_token_ids
    assert [i for i in ids if i >= 32000] == [32006, 32007, 32010, 32007, 32001]


@pytest.fixture()
def chatml_tokenizer(tokenizer_path: Path, tmp_path: Path) -> Path:
    """The fixture tokenizer with Phi-4's ChatML markers as special tokens."""
    data = json.loads(tokenizer_path.read_text())
    vocab = data["model"]["vocab"]
    for token_id, content in (
        (IM_START, "<|im_start|>"),
        (IM_SEP, "<|im_sep|>"),
        (IM_END, "<|im_end|>"),
    ):
        old = next(k for k, v in vocab.items() if v == token_id)
        vocab[content] = vocab.pop(old)
        data["added_tokens"].append(fx.added_token(token_id, content))
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    return path


def test_phi4_chatml_format_and_its_end_token(tmp_path: Path, chatml_tokenizer: Path) -> None:
    path = tmp_path / "phi4-like.gguf"
    # Phi-4 declares <|im_end|> as its EOS; no separate token list here (it is the tokenizer's).
    fx.write_phi3_gguf(
        path, TINY_CONFIG, chat_template=PHI4_TEMPLATE, omit_keys=("tokenizer.ggml.tokens",)
    )
    gen = Phi3Generator(path, tokenizer=chatml_tokenizer)
    assert IM_END in gen.end_token_ids  # found by name, as the model's end-of-turn token
    assert gen.apply_chat_template(MESSAGES) == (
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|>"
        "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>"
    )
    ids = gen.chat(MESSAGES, max_tokens=0).prompt_token_ids
    specials = [i for i in ids if i >= 32000]
    assert specials == [IM_START, IM_SEP, IM_END, IM_START, IM_SEP, IM_END, IM_START, IM_SEP]


def test_gguf_eos_and_named_end_tokens(tmp_path: Path, tokenizer_path: Path) -> None:
    path = tmp_path / "eot.gguf"
    fx.write_phi3_gguf(path, TINY_CONFIG)
    gen = Phi3Generator(path, tokenizer=tokenizer_path)
    # The fixture GGUF declares <|endoftext|> as EOS; <|end|> is known by name.
    assert set(gen.end_token_ids) == {32000, 32007}
