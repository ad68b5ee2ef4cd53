"""Loading from local paths and from the Hugging Face cache, and every loading failure."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import phi3_fixtures as fx
import pytest
from candle_phi import InvalidArgumentError, ModelLoadError, Phi3Generator, TokenizerError
from conftest import CHAT_PROMPT

MODEL_REPO = "microsoft/Phi-3-mini-4k-instruct-gguf"
MODEL_FILE = "Phi-3-mini-4k-instruct-q4.gguf"
TOKENIZER_REPO = "microsoft/Phi-3-mini-4k-instruct"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(cache: Path, repo: str, filename: str, source: Path, ref: str = "main") -> Path:
    """Lays a file out as huggingface_hub does: blobs/, snapshots/<commit>/ links, refs/."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    blob = folder / "blobs" / f"blob-{filename}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, blob)
    link = folder / "snapshots" / COMMIT / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(COMMIT)
    return link


def first_text(gen: Phi3Generator) -> str:
    return "".join(gen.generate(CHAT_PROMPT, max_tokens=8, seed=3))


def test_local_paths(generator: Phi3Generator, model_path: Path, tokenizer_path: Path) -> None:
    assert generator.model_path == model_path
    assert generator.tokenizer_path == tokenizer_path
    assert generator.context_length == 1024
    assert generator.vocab_size == 32064
    assert {32000, 32007} <= set(generator.end_token_ids)
    assert generator.load_time > 0
    assert "Phi3Generator(" in repr(generator)
    # str paths work as well as Path objects
    assert first_text(Phi3Generator(str(model_path), tokenizer=str(tokenizer_path))) == first_text(
        generator
    )


def test_tokenizer_beside_the_model_is_found(
    tmp_path: Path, model_path: Path, tokenizer_path: Path
) -> None:
    shutil.copyfile(model_path, tmp_path / "m.gguf")
    shutil.copyfile(tokenizer_path, tmp_path / "tokenizer.json")
    gen = Phi3Generator(tmp_path / "m.gguf")
    assert gen.tokenizer_path == tmp_path / "tokenizer.json"


def test_hub_cache_offline(
    clean_hub_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    model_path: Path,
    tokenizer_path: Path,
    generator: Phi3Generator,
) -> None:
    model_link = populate_cache(clean_hub_env, MODEL_REPO, MODEL_FILE, model_path)
    populate_cache(clean_hub_env, TOKENIZER_REPO, "tokenizer.json", tokenizer_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gen = Phi3Generator()
    assert gen.model_path == model_link
    assert first_text(gen) == first_text(generator)


def test_hub_cache_hit_needs_no_network(
    clean_hub_env: Path, model_path: Path, tokenizer_path: Path
) -> None:
    # HF_ENDPOINT points at a closed local port: any network use would fail.
    populate_cache(clean_hub_env, MODEL_REPO, MODEL_FILE, model_path)
    populate_cache(clean_hub_env, TOKENIZER_REPO, "tokenizer.json", tokenizer_path)
    assert Phi3Generator().vocab_size == 32064


def test_hub_overrides_and_commit_revision(
    clean_hub_env: Path, monkeypatch: pytest.MonkeyPatch, model_path: Path, tokenizer_path: Path
) -> None:
    populate_cache(clean_hub_env, "me/tiny", "tiny.gguf", model_path, ref="v1")
    populate_cache(clean_hub_env, "me/tok", "tokenizer.json", tokenizer_path, ref="v1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gen = Phi3Generator(
        repo_id="me/tiny",
        filename="tiny.gguf",
        revision="v1",
        tokenizer_repo_id="me/tok",
        tokenizer_revision="v1",
    )
    assert gen.model_path.name == "tiny.gguf"
    by_commit = Phi3Generator(
        repo_id="me/tiny",
        filename="tiny.gguf",
        revision=COMMIT,
        tokenizer_repo_id="me/tok",
        tokenizer_revision=COMMIT,
    )
    assert by_commit.model_path == gen.model_path


def test_hf_home_layout(
    clean_hub_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    model_path: Path,
    tokenizer_path: Path,
) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    populate_cache(tmp_path / "home" / "hub", MODEL_REPO, MODEL_FILE, model_path)
    populate_cache(tmp_path / "home" / "hub", TOKENIZER_REPO, "tokenizer.json", tokenizer_path)
    assert Phi3Generator().vocab_size == 32064


def test_offline_and_not_cached(clean_hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as info:
        Phi3Generator()
    assert MODEL_FILE in str(info.value)


def test_download_failure_is_a_model_load_error(clean_hub_env: Path) -> None:
    with pytest.raises(ModelLoadError, match=MODEL_REPO):
        Phi3Generator()


def test_missing_model_file(tmp_path: Path, tokenizer_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found") as info:
        Phi3Generator(tmp_path / "nope.gguf", tokenizer=tokenizer_path)
    assert "nope.gguf" in str(info.value)


def test_not_a_gguf(tmp_path: Path, tokenizer_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("<html>Not found</html>")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        Phi3Generator(path, tokenizer=tokenizer_path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        Phi3Generator(empty, tokenizer=tokenizer_path)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.9999])
def test_truncated(keep: float, tmp_path: Path, model_path: Path, tokenizer_path: Path) -> None:
    data = model_path.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="truncated") as info:
        Phi3Generator(path, tokenizer=tokenizer_path)
    assert "cut.gguf" in str(info.value)


def test_header_cut_off(tmp_path: Path, model_path: Path, tokenizer_path: Path) -> None:
    path = tmp_path / "header.gguf"
    path.write_bytes(model_path.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="header.gguf"):
        Phi3Generator(path, tokenizer=tokenizer_path)


def test_wrong_architecture(tmp_path: Path, tokenizer_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    fx.write_phi3_gguf(path, architecture="llama")
    with pytest.raises(ModelLoadError, match="'llama'.*phi3"):
        Phi3Generator(path, tokenizer=tokenizer_path)


@pytest.mark.parametrize(
    "key",
    [
        "phi3.block_count",
        "phi3.embedding_length",
        "phi3.attention.head_count",
        "phi3.context_length",
        "phi3.attention.layer_norm_rms_epsilon",
        "general.architecture",
    ],
)
def test_missing_key(key: str, tmp_path: Path, tokenizer_path: Path) -> None:
    path = tmp_path / "nokey.gguf"
    fx.write_phi3_gguf(path, omit_keys=(key,))
    with pytest.raises(ModelLoadError, match=key.replace(".", r"\.")):
        Phi3Generator(path, tokenizer=tokenizer_path)


@pytest.mark.parametrize(
    "tensor",
    ["token_embd.weight", "blk.1.attn_qkv.weight", "blk.0.ffn_down.weight", "output_norm.weight"],
)
def test_missing_tensor(tensor: str, tmp_path: Path, tokenizer_path: Path) -> None:
    path = tmp_path / "notensor.gguf"
    fx.write_phi3_gguf(path, omit_tensors=(tensor,))
    with pytest.raises(ModelLoadError, match=tensor.replace(".", r"\.")):
        Phi3Generator(path, tokenizer=tokenizer_path)


def test_unsupported_tensor_type(tmp_path: Path, tokenizer_path: Path) -> None:
    path = tmp_path / "iq.gguf"
    fx.write_phi3_gguf(path, tensor_types={"blk.0.ffn_down.weight": "IQ4_NL"})
    with pytest.raises(ModelLoadError, match=r"blk\.0\.ffn_down\.weight.*IQ4_NL"):
        Phi3Generator(path, tokenizer=tokenizer_path)


def test_missing_tokenizer(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tok.json"):
        Phi3Generator(model_path, tokenizer=tmp_path / "tok.json")


def test_invalid_tokenizer(model_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": 42}')
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Phi3Generator(model_path, tokenizer=bad)


def test_tokenizer_of_another_model(model_path: Path, tokenizer_path: Path, tmp_path: Path) -> None:
    data = json.loads(tokenizer_path.read_text())
    data["added_tokens"].append(fx.added_token(40000, "<|im_end|>"))
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="does not match the model"):
        Phi3Generator(model_path, tokenizer=other)
    data = json.loads(tokenizer_path.read_text())
    for token in data["added_tokens"]:
        if token["id"] == 32007:
            token["content"] = "<|im_end|>"
    vocab = data["model"]["vocab"]
    vocab["<|im_end|>"] = vocab.pop("<|end|>")
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="32007"):
        Phi3Generator(model_path, tokenizer=renamed)


ANON_RSS = """
import sys
from candle_phi import Phi3Generator

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

before = anon_kib()
gen = Phi3Generator(sys.argv[1], tokenizer=sys.argv[2])
print(anon_kib() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/self/status")
def test_k_quant_weights_are_mapped_not_copied(tmp_path: Path, tokenizer_path: Path) -> None:
    # K-quant matrices are multiplied where they lie in the mapped file: loading adds file
    # pages to the page cache, not anonymous memory. Candle's own QMatMul (for comparison)
    # holds a private copy of every matrix.
    import subprocess
    import sys

    path = tmp_path / "wide-q4k.gguf"
    config = fx.TinyPhi3Config(
        hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=8, intermediate_size=2048
    )
    fx.write_phi3_gguf(path, config, weight_type="Q4_K")

    def anon_growth_kib(kernels: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", ANON_RSS, str(path), str(tokenizer_path)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "CANDLE_PHI_KERNELS": kernels},
        )
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    from gguf import GGUFReader

    matrices_kib = (
        sum(
            int(t.n_bytes)
            for t in GGUFReader(path).tensors
            if t.name != "token_embd.weight" and len(t.shape) == 2
        )
        / 1024
    )
    # The portable kernels, so that this holds on any CPU. (The token embeddings are read
    # in place in both cases; what else a process holds is the same in both.)
    mapped = anon_growth_kib("scalar")
    copied = anon_growth_kib("candle")
    assert copied - mapped > 0.9 * matrices_kib, (mapped, copied, matrices_kib)
    assert mapped < 0.5 * copied, (mapped, copied, matrices_kib)


def test_unknown_kernels_are_an_error(
    monkeypatch: pytest.MonkeyPatch, model_path: Path, tokenizer_path: Path
) -> None:
    # A typo must not silently measure other kernels than the ones asked for.
    monkeypatch.setenv("CANDLE_PHI_KERNELS", "avx512")
    names = "avx-vnni, avx512-vnni, avx2, scalar"
    with pytest.raises(InvalidArgumentError, match=f"CANDLE_PHI_KERNELS.*{names}"):
        Phi3Generator(model_path, tokenizer=tokenizer_path)
    monkeypatch.setenv("CANDLE_PHI_KERNELS", "scalar")
    Phi3Generator(model_path, tokenizer=tokenizer_path)


def test_default_model_needs_only_the_gguf(
    clean_hub_env: Path, monkeypatch: pytest.MonkeyPatch, model_path: Path, generator: Phi3Generator
) -> None:
    """No tokenizer repository in the cache, and no network: the GGUF's own tokenizer."""
    link = populate_cache(clean_hub_env, MODEL_REPO, MODEL_FILE, model_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gen = Phi3Generator()
    assert gen.tokenizer_path == link
    assert gen.tokenize(CHAT_PROMPT) == generator.tokenize(CHAT_PROMPT)
    assert first_text(gen) == first_text(generator)


def test_from_pretrained_resolves_a_glob_in_the_cache(
    clean_hub_env: Path, monkeypatch: pytest.MonkeyPatch, model_path: Path, tokenizer_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    link = populate_cache(clean_hub_env, "me/tiny", "tiny-q4.gguf", model_path)
    populate_cache(clean_hub_env, "me/tiny", "README.md", tokenizer_path)
    gen = Phi3Generator.from_pretrained("me/tiny", "*q4.gguf")
    assert gen.model_path == link
    assert Phi3Generator.from_pretrained("me/tiny", "tiny-q?.gguf").model_path == link
    # Several matches name the candidates; none offline is "not cached".
    populate_cache(clean_hub_env, "me/tiny", "tiny-q4-b.gguf", model_path)
    with pytest.raises(
        InvalidArgumentError, match=r"matches 2 files.*tiny-q4-b\.gguf, tiny-q4\.gguf"
    ):
        Phi3Generator.from_pretrained("me/tiny", "*.gguf")
    with pytest.raises(ModelLoadError, match=r"\*q8\.gguf.*HF_HUB_OFFLINE"):
        Phi3Generator.from_pretrained("me/tiny", "*q8.gguf")
    with pytest.raises(InvalidArgumentError, match="given twice"):
        Phi3Generator.from_pretrained("me/tiny", "*q4.gguf", model="x.gguf")


# How many blocks glibc's malloc serves by mmap (mallinfo2's hblks) grows by when Python
# allocates a 24 MiB buffer, after loading a model or not ("load" or "none").
MAPPED_BLOCKS = """
import ctypes, sys
from candle_phi import Phi3Generator

class Mallinfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
if sys.argv[3] == "load":
    gen = Phi3Generator(sys.argv[1], tokenizer=sys.argv[2])
before = libc.mallinfo2().hblks
buffer = bytearray(24 << 20)
print(libc.mallinfo2().hblks - before)
"""


def glibc_has_mallinfo2() -> bool:
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    return hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not glibc_has_mallinfo2(), reason="glibc's malloc (2.33+) only")
@pytest.mark.parametrize(
    ("environment", "load", "mapped"),
    [
        ({}, "none", 1),  # the control: without a model, glibc maps such a block
        ({}, "load", 0),
        ({"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}, "load", 1),
    ],
    ids=["no-model", "engine-settings", "users-own"],
)
def test_loading_keeps_pass_sized_buffers_on_the_heap(
    model_path: Path, tokenizer_path: Path, environment: dict[str, str], load: str, mapped: int
) -> None:
    # Every forward pass allocates the same megabyte buffers again: served by fresh mmaps,
    # each pass would fault all their pages in again. Loading sets glibc's thresholds so
    # that blocks up to 32 MiB come from (and return to) the heap, unless the user set them.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", MAPPED_BLOCKS, str(model_path), str(tokenizer_path), load],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, **environment},
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == mapped
