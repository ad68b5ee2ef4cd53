"""Records llama.cpp's token ids for the tokenizer corpus, as tests/goldens/<vocab>.json.gz.

Needs llama-cpp-python (the version in tests/fixtures/llama_vocabs.py, built with any flags:
only its tokenizer runs, with vocab_only=True):

    pip install llama-cpp-python==0.3.36
    python scripts/tokenizer_goldens.py
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

import llama_cpp  # noqa: E402
import llama_vocabs  # noqa: E402
from tokenizer_corpus import corpus  # noqa: E402


def corpus_digest(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


def main() -> int:
    if llama_cpp.__version__ != llama_vocabs.LLAMA_CPP_PYTHON:
        print(f"need llama-cpp-python {llama_vocabs.LLAMA_CPP_PYTHON}, not {llama_cpp.__version__}")
        return 1
    texts = corpus()
    out_dir = ROOT / "tests" / "goldens"
    out_dir.mkdir(exist_ok=True)
    for name in llama_vocabs.SPM_VOCABS + llama_vocabs.BPE_VOCABS:
        path = llama_vocabs.vocab_dir() / f"ggml-vocab-{name}.gguf"
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        doc = {
            "llama_cpp_python": llama_cpp.__version__,
            "vocab": path.name,
            "corpus_sha256": corpus_digest(texts),
            # add_special=True, parse_special=True: what generate() sends for a prompt.
            "special": [llm.tokenize(t.encode(), add_bos=True, special=True) for t in texts],
            # add_special=False, parse_special=False: special-token text stays text.
            "plain": [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts],
        }
        target = out_dir / f"{name}.json.gz"
        with gzip.open(target, "wt", encoding="utf-8", compresslevel=9) as f:
            json.dump(doc, f, separators=(",", ":"))
        print(f"{target.relative_to(ROOT)}: {len(texts)} texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
