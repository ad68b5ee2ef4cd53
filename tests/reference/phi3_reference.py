"""An independent NumPy reference for Phi-3 GGUF files.

``reference_logits(path, token_ids)`` runs a plain float64 forward pass of the Phi-3
architecture (llama.cpp's ``phi3``) over any phi3 GGUF and returns the logits at every
position. It is written from the architecture, not from the engine, and it is meant to be
read: each step below is the textbook operation, with no caching, batching or fusion.

It trusts nothing but the file. Hyperparameters come from the GGUF's ``phi3.*`` keys via
``gguf.GGUFReader``; tensors are dequantized by ``gguf.quants.dequantize``. It deliberately
shares no code, constants or defaults with the fixture writer (``phi3_fixtures``) or with
the Rust engine, so that a mistake in either cannot cancel out against the same mistake
here. Defaults apply only where llama.cpp also defaults; a ``phi3.*`` key it does not
implement is an error rather than something silently ignored.

The architecture, per layer, on the residual stream x (one row per position):

    h = RMSNorm(x) * attn_norm
    q, k, v = rows [Q; K; V] of h @ attn_qkv.T
    q, k = RoPE(q), RoPE(k)       # NEOX half-split on the first rope_dim dims of each head
    x += softmax(q k^T / sqrt(head_dim) + mask) v @ attn_output.T   # GQA, causal (+ SWA)
    h = RMSNorm(x) * ffn_norm
    gate, up = rows [gate; up] of h @ ffn_up.T
    x += (SiLU(gate) * up) @ ffn_down.T

then logits = RMSNorm(x) * output_norm @ output.T, where ``output`` falls back to the tied
``token_embd`` when the file has no ``output.weight``.

LongRoPE (Phi-3 128k): with ``rope_factors_long/short.weight`` present, frequency i is
divided by factor i; the long factors apply when the request spans more than
``rope.scaling.original_context_length`` tokens, else the short ones, chosen once per
sequence (HF for a prompt past the original context, llama.cpp from its context size).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGUFReader
from gguf.quants import dequantize

F64Array = npt.NDArray[np.float64]

__all__ = ["reference_logits"]


@dataclass(frozen=True)
class _Hparams:
    """The phi3.* keys, with llama.cpp's defaults filled in where it has them."""

    context_length: int
    embedding_length: int
    feed_forward_length: int
    block_count: int
    head_count: int
    head_count_kv: int
    key_length: int  # per-head size of Q and K
    value_length: int  # per-head size of V
    rms_eps: float
    sliding_window: int  # 0: every earlier position is visible
    rope_dim: int
    rope_freq_base: float
    original_context_length: int
    rope_attn_factor: float | None  # None: not in the file
    vocab_size: int | None  # None: not in the file


# Keys llama.cpp requires for phi3; the rest of _KNOWN_KEYS are optional.
_REQUIRED_KEYS = (
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "block_count",
    "attention.head_count",
    "attention.layer_norm_rms_epsilon",
)
_KNOWN_KEYS = {
    *_REQUIRED_KEYS,
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.sliding_window",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.original_context_length",
    "rope.scaling.attn_factor",
    "vocab_size",
}


def _parse_hparams(keys: Mapping[str, Any]) -> _Hparams:
    unknown = sorted(set(keys) - _KNOWN_KEYS)
    if unknown:
        raise ValueError(f"the reference does not implement phi3.{unknown[0]} (all: {unknown})")
    missing = [k for k in _REQUIRED_KEYS if k not in keys]
    if missing:
        raise ValueError(f"the file lacks required keys: {['phi3.' + k for k in missing]}")

    n_embd, n_heads = int(keys["embedding_length"]), int(keys["attention.head_count"])
    key_length = int(keys.get("attention.key_length", n_embd // n_heads))
    context_length = int(keys["context_length"])
    attn_factor = keys.get("rope.scaling.attn_factor")
    vocab_size = keys.get("vocab_size")
    hp = _Hparams(
        context_length=context_length,
        embedding_length=n_embd,
        feed_forward_length=int(keys["feed_forward_length"]),
        block_count=int(keys["block_count"]),
        head_count=n_heads,
        head_count_kv=int(keys.get("attention.head_count_kv", n_heads)),
        key_length=key_length,
        value_length=int(keys.get("attention.value_length", n_embd // n_heads)),
        rms_eps=float(keys["attention.layer_norm_rms_epsilon"]),
        sliding_window=int(keys.get("attention.sliding_window", 0)),
        rope_dim=int(keys.get("rope.dimension_count", key_length)),
        rope_freq_base=float(keys.get("rope.freq_base", 10000.0)),
        original_context_length=int(
            keys.get("rope.scaling.original_context_length", context_length)
        ),
        rope_attn_factor=None if attn_factor is None else float(attn_factor),
        vocab_size=None if vocab_size is None else int(vocab_size),
    )
    if hp.head_count_kv <= 0 or hp.head_count % hp.head_count_kv:
        raise ValueError(f"head_count {n_heads} is not a multiple of head_count_kv")
    if hp.rope_dim % 2 or not 0 < hp.rope_dim <= hp.key_length:
        raise ValueError(f"rope dimension {hp.rope_dim} must be even and <= {hp.key_length}")
    return hp


def _check_shape(tensors: Mapping[str, F64Array], name: str, shape: tuple[int, ...]) -> None:
    if name not in tensors:
        raise ValueError(f"the file lacks tensor {name}")
    if tensors[name].shape != shape:
        raise ValueError(f"{name} has shape {tensors[name].shape}, expected {shape}")


def _check_tensors(hp: _Hparams, t: Mapping[str, F64Array]) -> None:
    """Refuse a file whose tensors disagree with its keys rather than broadcast."""
    if "token_embd.weight" not in t:
        raise ValueError("the file lacks tensor token_embd.weight")
    vocab, n_embd = t["token_embd.weight"].shape[0], hp.embedding_length
    if hp.vocab_size is not None and hp.vocab_size != vocab:
        raise ValueError(f"phi3.vocab_size {hp.vocab_size} != token_embd rows {vocab}")
    _check_shape(t, "token_embd.weight", (vocab, n_embd))
    q_rows = hp.head_count * hp.key_length
    qkv_rows = q_rows + hp.head_count_kv * (hp.key_length + hp.value_length)
    for i in range(hp.block_count):
        _check_shape(t, f"blk.{i}.attn_norm.weight", (n_embd,))
        _check_shape(t, f"blk.{i}.attn_qkv.weight", (qkv_rows, n_embd))
        _check_shape(t, f"blk.{i}.attn_output.weight", (n_embd, hp.head_count * hp.value_length))
        _check_shape(t, f"blk.{i}.ffn_norm.weight", (n_embd,))
        _check_shape(t, f"blk.{i}.ffn_up.weight", (2 * hp.feed_forward_length, n_embd))
        _check_shape(t, f"blk.{i}.ffn_down.weight", (n_embd, hp.feed_forward_length))
    _check_shape(t, "output_norm.weight", (n_embd,))
    if "output.weight" in t:
        _check_shape(t, "output.weight", (vocab, n_embd))
    factors = [n for n in ("rope_factors_long.weight", "rope_factors_short.weight") if n in t]
    if len(factors) == 1:
        raise ValueError(f"the file has {factors[0]} without its long/short counterpart")
    for name in factors:
        _check_shape(t, name, (hp.rope_dim // 2,))


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int, size: int) -> tuple[_Hparams, dict[str, F64Array]]:
    """The hyperparameters and every tensor, dequantized to float64, row-major.

    Parsing a 32k-token vocabulary takes GGUFReader about a second, so loads are cached;
    mtime and size are in the key so that a rewritten file is read again.
    """
    reader = GGUFReader(path)
    keys = {
        name.removeprefix("phi3."): field.contents()
        for name, field in reader.fields.items()
        if name.startswith("phi3.")
    }
    hp = _parse_hparams(keys)
    tensors: dict[str, F64Array] = {}
    for t in reader.tensors:
        # GGUF lists dimensions innermost first; NumPy wants them outermost first.
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        array = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(shape)
        array.flags.writeable = False  # shared by every caller of the cache
        tensors[t.name] = array
    _check_tensors(hp, tensors)
    return hp, tensors


def _rms_norm(x: F64Array, weight: F64Array, eps: float) -> F64Array:
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    out: F64Array = x / rms * weight
    return out


def _rope_tables(
    hp: _Hparams, tensors: Mapping[str, F64Array], n_positions: int, span: int
) -> tuple[F64Array, F64Array]:
    """cos and sin of shape (positions, 1, rope_dim / 2), attention scaling included."""
    half = hp.rope_dim // 2
    inv_freq = hp.rope_freq_base ** (-2.0 * np.arange(half) / hp.rope_dim)

    has_factors = "rope_factors_long.weight" in tensors
    if has_factors:
        long = span > hp.original_context_length
        inv_freq = inv_freq / tensors[f"rope_factors_{'long' if long else 'short'}.weight"]

    if hp.rope_attn_factor is not None:
        scale = hp.rope_attn_factor
    elif has_factors and hp.context_length > hp.original_context_length:
        # What llama.cpp's converter writes and HF computes for LongRoPE.
        ratio = hp.context_length / hp.original_context_length
        scale = math.sqrt(1 + math.log(ratio) / math.log(hp.original_context_length))
    else:
        scale = 1.0

    angles = np.arange(n_positions)[:, None, None] * inv_freq  # one row of heads to broadcast
    return scale * np.cos(angles), scale * np.sin(angles)


def _rope(x: F64Array, cos: F64Array, sin: F64Array) -> F64Array:
    """NEOX rotation of x (positions, heads, head_dim): dim i pairs with dim i + half.

    Dims past rope_dim pass through unrotated.
    """
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def _attention_mask(n_positions: int, sliding_window: int) -> F64Array:
    """0 where query p may see key j, -inf elsewhere: j <= p, and p - j < window if set."""
    p = np.arange(n_positions)[:, None]
    j = np.arange(n_positions)[None, :]
    visible = j <= p
    if sliding_window > 0:
        visible &= p - j < sliding_window
    mask: F64Array = np.where(visible, 0.0, -np.inf)
    return mask


def _softmax(scores: F64Array) -> F64Array:
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    out: F64Array = e / e.sum(axis=-1, keepdims=True)
    return out


def _stored(x: F64Array, kv_cache: str) -> F64Array:
    """Keys or values (positions, heads, dims) as a cache of type ``kv_cache`` holds them."""
    if kv_cache == "f64":
        return x
    if kv_cache == "f16":
        return x.astype(np.float16).astype(np.float64)
    if kv_cache == "q8_0":
        # Blocks of 32 along each head's vector: scale amax / 127, values rounded to it.
        *lead, d = x.shape
        pad = -d % 32
        blocks = np.pad(x, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, -1, 32)
        scale = np.abs(blocks).max(axis=-1, keepdims=True).astype(np.float32) / np.float32(127)
        inverse = np.where(scale > 0, 1 / np.where(scale > 0, scale, 1), 0).astype(np.float32)
        q = np.round(blocks.astype(np.float32) * inverse)
        return (q * scale).astype(np.float64).reshape(*lead, -1)[..., :d]
    raise ValueError(f"kv_cache must be 'f64', 'f16' or 'q8_0', not {kv_cache!r}")


def reference_logits(
    gguf_path: str | os.PathLike[str],
    token_ids: Sequence[int],
    *,
    span: int | None = None,
    kv_cache: str = "f64",
) -> F64Array:
    """Float64 logits of a phi3 GGUF at every position, shape (len(token_ids), vocab).

    ``token_ids`` sit at positions 0, 1, ...; ``span`` is the length of the whole request
    (prompt plus generated tokens) and only picks the LongRoPE factors; it defaults to
    ``len(token_ids)``. ``kv_cache`` rounds keys and values as a cache of that type stores
    them ("f16": to float16, as llama.cpp's default cache does; "q8_0": to 8-bit blocks of
    32 with one scale each); "f64" keeps them exact.
    """
    stat = os.stat(gguf_path)
    hp, w = _load(os.fspath(gguf_path), stat.st_mtime_ns, stat.st_size)
    n = len(token_ids)
    vocab = w["token_embd.weight"].shape[0]
    if n == 0:
        raise ValueError("token_ids is empty")
    if not all(0 <= t < vocab for t in token_ids):
        raise ValueError(f"token ids must lie in [0, {vocab})")
    span = n if span is None else span
    if span < n:
        raise ValueError(f"span {span} is shorter than the {n} tokens it must contain")

    n_heads, n_kv = hp.head_count, hp.head_count_kv
    dk, dv = hp.key_length, hp.value_length
    cos, sin = _rope_tables(hp, w, n, span)
    mask = _attention_mask(n, hp.sliding_window)

    x: F64Array = w["token_embd.weight"][list(token_ids)]
    for i in range(hp.block_count):
        h = _rms_norm(x, w[f"blk.{i}.attn_norm.weight"], hp.rms_eps)
        qkv = h @ w[f"blk.{i}.attn_qkv.weight"].T
        q, k, v = np.split(qkv, [n_heads * dk, (n_heads + n_kv) * dk], axis=-1)
        q = _rope(q.reshape(n, n_heads, dk), cos, sin)
        k = _rope(k.reshape(n, n_kv, dk), cos, sin)
        v = v.reshape(n, n_kv, dv)
        k, v = _stored(k, kv_cache), _stored(v, kv_cache)
        # GQA: query head h reads kv head h // (n_heads // n_kv).
        k = np.repeat(k, n_heads // n_kv, axis=1)
        v = np.repeat(v, n_heads // n_kv, axis=1)
        scores = np.einsum("phd,jhd->hpj", q, k) / math.sqrt(dk) + mask
        attn = np.einsum("hpj,jhd->phd", _softmax(scores), v).reshape(n, n_heads * dv)
        x = x + attn @ w[f"blk.{i}.attn_output.weight"].T

        h = _rms_norm(x, w[f"blk.{i}.ffn_norm.weight"], hp.rms_eps)
        gate, up = np.split(h @ w[f"blk.{i}.ffn_up.weight"].T, 2, axis=-1)
        silu = gate / (1 + np.exp(-gate))
        x = x + (silu * up) @ w[f"blk.{i}.ffn_down.weight"].T

    # Tied models reuse the token embedding as the output projection.
    output = w.get("output.weight", w["token_embd.weight"])
    logits: F64Array = _rms_norm(x, w["output_norm.weight"], hp.rms_eps) @ output.T
    return logits
