"""The tokenizer built from a GGUF's own metadata, against llama.cpp on real vocabularies.

llama.cpp's vocab-only GGUFs (Phi-3, Llama 2 and 3, GPT-2, Qwen2, DeepSeek, Falcon, ...) come
from the llama-cpp-python sdist (tests/fixtures/llama_vocabs.py); the ids llama.cpp gives
for the corpus (tests/fixtures/tokenizer_corpus.py) are recorded in tests/goldens/ by
scripts/tokenizer_goldens.py. CI sets CANDLE_PHI_REQUIRE_VOCABS=1, so that a failed download
fails these tests instead of skipping them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import llama_vocabs
import numpy as np
import pytest
from candle_phi import Phi3Generator, Tokenizer, TokenizerError
from conftest import CHAT_PROMPT
from gguf import GGUFWriter
from tokenizer_corpus import corpus

GOLDENS = Path(__file__).parent / "goldens"
TEXTS = corpus()


@pytest.fixture(scope="session")
def vocabs() -> Path:
    try:
        return llama_vocabs.vocab_dir()
    except Exception as exc:  # no network, or PyPI refused
        if os.environ.get("CANDLE_PHI_REQUIRE_VOCABS") == "1":
            raise
        pytest.skip(f"llama.cpp's vocab files are not available: {exc}")


def golden(name: str) -> dict[str, Any]:
    with gzip.open(GOLDENS / f"{name}.json.gz", "rt", encoding="utf-8") as f:
        doc: dict[str, Any] = json.load(f)
    digest = hashlib.sha256(json.dumps(TEXTS, ensure_ascii=False).encode()).hexdigest()
    assert doc["corpus_sha256"] == digest, "the corpus changed: run scripts/tokenizer_goldens.py"
    return doc


def strips_unicode_space_after_special(tok: Tokenizer, text: str) -> bool:
    """Phi-3's special tokens strip the whitespace after them: Unicode whitespace here (as
    in Hugging Face's tokenizers), ASCII only in llama.cpp (C's isspace on bytes)."""
    for special in ("</s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"):
        at = text.find(special)
        while at != -1:
            after = text[at + len(special) : at + len(special) + 1]
            if after.isspace() and not after.isascii():
                return True
            at = text.find(special, at + 1)
    return False


@pytest.mark.parametrize("name", llama_vocabs.SPM_VOCABS + llama_vocabs.BPE_VOCABS)
def test_ids_equal_llama_cpp_on_the_corpus(vocabs: Path, name: str) -> None:
    tok = Tokenizer.from_gguf(vocabs / f"ggml-vocab-{name}.gguf")
    expected = golden(name)
    assert len(TEXTS) >= 500
    differences = []
    for text, special, plain in zip(TEXTS, expected["special"], expected["plain"], strict=True):
        got = tok.encode(text, add_special_tokens=True, parse_special=True)
        if got != special and not (
            name == "phi-3" and strips_unicode_space_after_special(tok, text)
        ):
            differences.append(("special", text, special, got))
        got = tok.encode(text, add_special_tokens=False, parse_special=False)
        if got != plain:
            differences.append(("plain", text, plain, got))
    assert differences == []


@pytest.mark.parametrize("name", llama_vocabs.SPM_VOCABS + llama_vocabs.BPE_VOCABS)
def test_decoding_gives_back_the_text(vocabs: Path, name: str) -> None:
    tok = Tokenizer.from_gguf(vocabs / f"ggml-vocab-{name}.gguf")
    for text in TEXTS:
        if name in llama_vocabs.SPM_VOCABS and "\u2581" in text:
            continue  # SentencePiece writes spaces as U+2581: that one decodes as a space
        if name in llama_vocabs.BPE_VOCABS and lacks_a_byte(tok, text):
            continue  # a byte with no token is dropped, by llama.cpp as by tokenizers
        ids = tok.encode(text, add_special_tokens=False, parse_special=False)
        assert tok.decode(ids) == text


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (its bytes_to_unicode)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = (b for b in range(256) if b not in printable)
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return chars


BYTE_CHARS = gpt2_byte_chars()


def lacks_a_byte(tok: Tokenizer, text: str) -> bool:
    return any(tok.token_to_id(BYTE_CHARS[b]) is None for b in set(text.encode()))


def upstream_cases(path: Path) -> list[tuple[str, list[int]]]:
    texts = path.with_suffix(".gguf.inp").read_text(encoding="utf-8")
    ids = path.with_suffix(".gguf.out").read_text(encoding="utf-8")
    inputs = texts.split("\n__ggml_vocab_test__\n")
    outputs = [[int(x) for x in line.split()] for line in ids.split("\n")]
    return list(zip(inputs, outputs[: len(inputs)], strict=True))


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in llama_vocabs.SPM_VOCABS + llama_vocabs.BPE_VOCABS
        if n not in {"baichuan", "aquila", "gpt-neox"}
    ],
)
def test_llama_cpp_own_tokenizer_tests(vocabs: Path, name: str) -> None:
    """llama.cpp's test-tokenizer-0 cases (models/ggml-vocab-*.gguf.inp / .out)."""
    path = vocabs / f"ggml-vocab-{name}.gguf"
    tok = Tokenizer.from_gguf(path)
    cases = upstream_cases(path)
    assert len(cases) >= 40
    for text, ids in cases:
        assert tok.encode(text, add_special_tokens=False) == ids, text


@pytest.mark.parametrize("name", llama_vocabs.UNSUPPORTED_VOCABS)
def test_unsupported_tokenizer_types_say_to_pass_a_tokenizer_json(vocabs: Path, name: str) -> None:
    with pytest.raises(TokenizerError, match=r"is not supported.*tokenizer\.json"):
        Tokenizer.from_gguf(vocabs / f"ggml-vocab-{name}.gguf")


def test_phi3_special_tokens_and_right_strip(vocabs: Path) -> None:
    tok = Tokenizer.from_gguf(vocabs / "ggml-vocab-phi-3.gguf")
    ids = tok.encode("<|user|>\nHi<|end|>\n<|assistant|>")
    assert ids[0] == 1  # add_bos_token
    assert ids[1] == 32010 and 32007 in ids and ids[-1] == 32001
    # The newline after <|user|> is stripped, as llama.cpp does for Phi-3 files.
    assert ids[:3] == [1, 32010, tok.encode("Hi", add_special_tokens=False)[0]]
    assert tok.decode(ids, skip_special_tokens=True) == "Hi"
    assert {32000, 32007} <= set(tok.end_token_ids)
    # Special-token text as plain text stays text.
    assert 32010 not in tok.encode("<|user|>", parse_special=False)


def write_bpe_gguf(path: Path, **overrides: Any) -> None:
    """A minimal byte-level BPE vocabulary with `overrides` on its tokenizer keys."""
    writer = GGUFWriter(str(path), "gpt2")
    tokens = [chr(c) for c in range(0x21, 0x7F)] + ["Ġ", "ab", "Ġab", "<|endoftext|>"]
    writer.add_tokenizer_model(overrides.pop("model", "gpt2"))
    if "pre" in overrides:
        writer.add_tokenizer_pre(overrides.pop("pre"))
    writer.add_token_list(overrides.pop("tokens", tokens))
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(overrides.pop("merges", ["a b", "Ġ ab"]))
    writer.add_eos_token_id(len(tokens) - 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unknown_pre_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    write_bpe_gguf(path, pre="no-such-splitter")
    with pytest.raises(TokenizerError, match=r"no-such-splitter.*tokenizer\.json"):
        Tokenizer.from_gguf(path)
    write_bpe_gguf(path, pre="kimi-k2")
    with pytest.raises(TokenizerError, match=r"kimi-k2.*cannot build.*tokenizer\.json"):
        Tokenizer.from_gguf(path)


def test_broken_merges_are_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    write_bpe_gguf(path, pre="gpt-2", merges=["a b", "nospace", "x y", "Ġ ab", " ", "a  b"])
    tok = Tokenizer.from_gguf(path)
    assert tok.encode(" ab ab") == [tok.token_to_id("Ġab"), tok.token_to_id("Ġab")]
    assert tok.decode(tok.encode("hello ab")) == "hello ab"


def test_hostile_vocabulary_fails_cleanly_or_works(tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    write_bpe_gguf(path, model="t5")
    with pytest.raises(TokenizerError, match="not supported"):
        Tokenizer.from_gguf(path)
    # A megabyte-long piece must not make building quadratic, nor break encoding.
    writer = GGUFWriter(str(path), "llama")
    tokens = ["<unk>", "<s>", "</s>", "▁", "a", "▁a", "x" * (1 << 20)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, float("nan"), -3.0])
    writer.add_token_types([3, 3, 3, 1, 1, 1, 1])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = Tokenizer.from_gguf(path)
    assert tok.encode("a a", add_special_tokens=False) == [5, 5]
    # "▁" (the space prefix), then <unk> for "xx": there are no byte tokens to fall back to.
    assert tok.encode("xx", add_special_tokens=False) == [3, 0]


def test_generator_uses_the_gguf_tokenizer_without_a_tokenizer_json(
    tmp_path: Path, model_path: Path, generator: Phi3Generator
) -> None:
    """The fixture GGUF's metadata describes the same tokenizer as the fixture
    tokenizer.json: without one, the generator encodes, decodes and generates the same."""
    alone = tmp_path / "alone.gguf"
    shutil.copyfile(model_path, alone)
    gen = Phi3Generator(alone)
    assert gen.tokenizer_path == alone
    for text in TEXTS:
        assert gen.tokenize(text) == generator.tokenize(text), text
    ids = generator.tokenize(CHAT_PROMPT)
    assert gen.detokenize(ids) == generator.detokenize(ids)
    assert gen.end_token_ids == generator.end_token_ids
    first = "".join(gen.generate(CHAT_PROMPT, max_tokens=12, seed=5, temperature=0.8))
    assert first == "".join(generator.generate(CHAT_PROMPT, max_tokens=12, seed=5, temperature=0.8))
    assert np.isfinite(gen.logits(ids[:4])).all()
