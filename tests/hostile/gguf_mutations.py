"""Malformed GGUF files, made from a valid one by precise edits.

``Gguf.parse`` reads a GGUF (v2/v3, little-endian) with ``struct`` alone and records where
every field lies: the counts, each key/value record, each tensor info, the data section.
Mutations then either patch bytes in place (a length or a count that lies about what
follows) or rebuild the file from edited records (a new key, a tensor with other dims),
re-padding the data section as a writer would unless told not to.

``malformed_ggufs`` lists the corpus: each ``Mutation`` names a category and makes its
bytes on demand, so that only the files being run exist at a time. Everything random
comes from ``random.Random(seed)``: the same seed gives the same files.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import IntEnum
from functools import partial

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


class ValueType(IntEnum):
    """GGUF metadata value types."""

    U8 = 0
    I8 = 1
    U16 = 2
    I16 = 3
    U32 = 4
    I32 = 5
    F32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    U64 = 10
    I64 = 11
    F64 = 12


class GgmlType(IntEnum):
    """The ggml tensor types the corpus names (llama.cpp's numbering)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q4_2_REMOVED = 4
    Q4_3_REMOVED = 5
    Q8_0 = 8
    Q2_K = 10
    Q4_K = 12
    Q6_K = 14
    Q8_K = 15
    IQ4_NL = 20
    I8 = 24
    I32 = 26
    F64 = 28
    BF16 = 30
    TQ2_0 = 35
    MXFP4 = 39


_SCALAR_FORMATS = {
    ValueType.U8: "<B",
    ValueType.I8: "<b",
    ValueType.U16: "<H",
    ValueType.I16: "<h",
    ValueType.U32: "<I",
    ValueType.I32: "<i",
    ValueType.F32: "<f",
    ValueType.BOOL: "<B",
    ValueType.U64: "<Q",
    ValueType.I64: "<q",
    ValueType.F64: "<d",
}

# --------------------------------------------------------------------------- encoding


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def gguf_string(text: str | bytes) -> bytes:
    """A GGUF string: u64 byte length, then the bytes (need not be valid UTF-8)."""
    raw = text.encode() if isinstance(text, str) else text
    return u64(len(raw)) + raw


def scalar(vtype: ValueType, value: float) -> bytes:
    return struct.pack(_SCALAR_FORMATS[vtype], value)


def array(item_type: ValueType, items: Iterable[float] | Iterable[str | bytes]) -> bytes:
    """An array payload: item type, count, then the items."""
    encoded = [
        gguf_string(item) if isinstance(item, (str, bytes)) else scalar(item_type, item)
        for item in items
    ]
    return u32(item_type) + u64(len(encoded)) + b"".join(encoded)


def nested_arrays(depth: int) -> bytes:
    """An array holding an array holding ... ``depth`` levels deep, innermost empty."""
    head = u32(ValueType.ARRAY) + u64(1)
    return head * (depth - 1) + u32(ValueType.U8) + u64(0)


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    vtype: int
    payload: bytes  # the encoded value, as it follows the type field
    start: int = -1  # where the record (its key length) starts in the parsed file
    value_start: int = -1  # where the payload starts in the parsed file


@dataclass(frozen=True)
class TensorInfo:
    name: bytes
    dims: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section
    start: int = -1  # where the record starts in the parsed file
    type_field: int = -1  # where its ggml type field lies
    offset_field: int = -1  # where its offset field lies


class _Reader:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.pos = 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.raw, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def skip_string(self) -> bytes:
        n = self.take("<Q")
        self.pos += n
        return self.raw[self.pos - n : self.pos]

    def skip_value(self, vtype: int) -> None:
        if vtype == ValueType.STRING:
            self.skip_string()
        elif vtype == ValueType.ARRAY:
            item_type = self.take("<I")
            count = self.take("<Q")
            if item_type in _SCALAR_FORMATS:
                self.pos += count * struct.calcsize(_SCALAR_FORMATS[ValueType(item_type)])
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        else:
            self.pos += struct.calcsize(_SCALAR_FORMATS[ValueType(vtype)])


@dataclass(frozen=True)
class Gguf:
    """A parsed valid GGUF: its records with their positions, and the data section."""

    raw: bytes
    version: int
    kvs: tuple[KeyValue, ...]
    tensors: tuple[TensorInfo, ...]
    kv_start: int
    tensor_infos_start: int
    tensor_infos_end: int
    data_start: int
    alignment: int

    @classmethod
    def parse(cls, raw: bytes) -> Gguf:
        r = _Reader(raw)
        if raw[:4] != MAGIC:
            raise ValueError("not a GGUF file")
        r.pos = 4
        version = r.take("<I")
        n_tensors = r.take("<Q")
        n_kv = r.take("<Q")
        kv_start = r.pos
        kvs = []
        for _ in range(n_kv):
            start = r.pos
            key = r.skip_string()
            vtype = r.take("<I")
            value_start = r.pos
            r.skip_value(vtype)
            kvs.append(KeyValue(key, vtype, raw[value_start : r.pos], start, value_start))
        tensor_infos_start = r.pos
        tensors = []
        for _ in range(n_tensors):
            start = r.pos
            name = r.skip_string()
            n_dims = r.take("<I")
            dims = tuple(r.take("<Q") for _ in range(n_dims))
            type_field = r.pos
            ggml_type = r.take("<I")
            offset_field = r.pos
            offset = r.take("<Q")
            tensors.append(
                TensorInfo(name, dims, ggml_type, offset, start, type_field, offset_field)
            )
        tensor_infos_end = r.pos
        alignment = DEFAULT_ALIGNMENT
        for kv in kvs:
            if kv.key == b"general.alignment":
                alignment = struct.unpack("<I", kv.payload)[0]
        data_start = -(-tensor_infos_end // alignment) * alignment
        return cls(
            raw,
            version,
            tuple(kvs),
            tuple(tensors),
            kv_start,
            tensor_infos_start,
            tensor_infos_end,
            data_start,
            alignment,
        )

    @property
    def data(self) -> bytes:
        return self.raw[self.data_start :]

    def kv(self, key: str) -> KeyValue:
        for kv in self.kvs:
            if kv.key == key.encode():
                return kv
        raise KeyError(key)

    def tensor(self, name: str) -> TensorInfo:
        for info in self.tensors:
            if info.name == name.encode():
                return info
        raise KeyError(name)

    def data_bytes(self, name: str) -> tuple[int, int]:
        """Where a tensor's bytes lie in the file: (start, end), from the next tensor's offset."""
        info = self.tensor(name)
        later = [t.offset for t in self.tensors if t.offset > info.offset]
        end = min(later) if later else len(self.data)
        return self.data_start + info.offset, self.data_start + end

    def structural_spans(self) -> list[tuple[int, int]]:
        """The parts of the header a reader interprets: counts, keys, types, lengths, small
        values and the first bytes of each array (not the bulk of the token list), and
        every tensor info."""
        spans = [(0, self.kv_start)]
        for kv in self.kvs:
            spans.append((kv.start, kv.value_start + min(len(kv.payload), 64)))
        spans.append((self.tensor_infos_start, self.tensor_infos_end))
        return spans

    # ----------------------------------------------------------------------- rebuilding

    def rebuilt(
        self,
        *,
        kvs: Iterable[KeyValue] | None = None,
        tensors: Iterable[TensorInfo] | None = None,
        alignment: int | None = None,
        data: bytes | None = None,
    ) -> bytes:
        """The file again from (edited) records, counts and all. The data section is padded
        to ``alignment`` (this file's by default; 0 or 1: not padded), so tensor offsets
        keep their meaning."""
        kvs = self.kvs if kvs is None else tuple(kvs)
        tensors = self.tensors if tensors is None else tuple(tensors)
        out = bytearray(MAGIC)
        out += u32(self.version) + u64(len(tensors)) + u64(len(kvs))
        for kv in kvs:
            out += gguf_string(kv.key) + u32(kv.vtype) + kv.payload
        for info in tensors:
            out += gguf_string(info.name) + u32(len(info.dims))
            out += b"".join(u64(d) for d in info.dims)
            out += u32(info.ggml_type) + u64(info.offset)
        pad_to = self.alignment if alignment is None else alignment
        if pad_to > 1:
            out += bytes(-len(out) % pad_to)
        out += self.data if data is None else data
        return bytes(out)

    def with_kv(self, key: str | bytes, vtype: int, payload: bytes) -> bytes:
        """This file with ``key`` set (in place if present, else appended)."""
        raw_key = key.encode() if isinstance(key, str) else key
        new = KeyValue(raw_key, vtype, payload)
        kvs = [new if kv.key == raw_key else kv for kv in self.kvs]
        if new not in kvs:
            kvs.append(new)
        return self.rebuilt(kvs=kvs)

    def with_scalar(self, key: str, vtype: ValueType, value: float) -> bytes:
        return self.with_kv(key, vtype, scalar(vtype, value))

    def without_kv(self, key: str) -> bytes:
        return self.rebuilt(kvs=[kv for kv in self.kvs if kv.key != key.encode()])

    def with_tensor(self, tensor: str, /, **changes: object) -> bytes:
        """This file with one tensor info changed (``name``, ``dims``, ``ggml_type``,
        ``offset``)."""
        edited = [
            replace(t, **changes) if t.name == tensor.encode() else t  # type: ignore[arg-type]
            for t in self.tensors
        ]
        return self.rebuilt(tensors=edited)

    def patched(self, at: int, new: bytes) -> bytes:
        """The original bytes with ``new`` written over those at ``at``."""
        return self.raw[:at] + new + self.raw[at + len(new) :]


# --------------------------------------------------------------------------- the corpus

Maker = Callable[[], bytes]


@dataclass(frozen=True)
class Mutation:
    category: str
    name: str
    make: Maker


def _group(category: str, makers: dict[str, Maker]) -> list[Mutation]:
    return [Mutation(category, name, make) for name, make in makers.items()]


# Field values that overflow whatever a reader may compute from them.
HUGE = {"2^31": 2**31, "2^40": 2**40, "2^63": 2**63, "u64_max": U64_MAX}
U32_EDGES = {"u32_max": U32_MAX, "2^32": 2**32, "10^12": 10**12, "u64_max": U64_MAX}


def malformed_ggufs(base: Gguf, seed: int) -> list[Mutation]:
    """The malformed-GGUF corpus made from ``base``, the fixtures' tiny Q8_0 Phi-3 (hidden
    size 64, 4 heads, 2 layers, 32064 tokens)."""
    return [
        *_truncations(base, random.Random(seed)),
        *_magic_and_version(base),
        *_counts_and_lengths(base),
        *_value_types(base),
        *_tensor_types(base),
        *_dims(base),
        *_offsets_and_alignment(base),
        *_hyperparameters(base),
        *_missing_and_duplicated(base),
        *_header_flips(base, random.Random(seed + 1)),
        *_data_flips(base, random.Random(seed + 2)),
    ]


def _truncations(base: Gguf, rng: random.Random) -> list[Mutation]:
    tokens = base.kv("tokenizer.ggml.tokens")
    first = base.tensors[0]
    embd_start, embd_end = base.data_bytes("token_embd.weight")
    size = len(base.raw)
    points = {
        "empty": 0,
        "1_byte": 1,
        "partial_magic": 3,
        "magic_only": 4,
        "partial_version": 6,
        "no_counts": 8,
        "partial_tensor_count": 12,
        "no_kv_count": 16,
        "partial_kv_count": 20,
        "header_only": base.kv_start,
        "partial_first_key_length": base.kv_start + 3,
        "partial_first_key": base.kv_start + 10,
        "first_key_no_type": base.kvs[0].value_start - 2,
        "first_value_cut": base.kvs[0].value_start + 4,
        "token_list_head": tokens.value_start + 6,
        "token_list_middle": tokens.value_start + len(tokens.payload) // 2,
        "kvs_only": base.tensor_infos_start,
        "partial_tensor_name": first.start + 9,
        "partial_dims": first.type_field - 4,
        "no_tensor_offset": first.offset_field,
        "tensor_infos_only": base.tensor_infos_end,
        "at_data_start": base.data_start,
        "embedding_half": (embd_start + embd_end) // 2,
        "last_tensor_cut": size - 100,
        "one_byte_short": size - 1,
    }
    points |= {f"random_header_{i}": rng.randrange(base.data_start) for i in range(6)}
    points |= {f"random_data_{i}": rng.randrange(base.data_start, size) for i in range(4)}
    makers: dict[str, Maker] = {
        f"{name}_at_{at}": partial(_prefix, base.raw, at) for name, at in points.items()
    }
    makers["trailing_garbage"] = lambda: base.raw + b"\xff" * 4096
    return _group("truncation", makers)


def _prefix(raw: bytes, n: int) -> bytes:
    return raw[:n]


def _magic_and_version(base: Gguf) -> list[Mutation]:
    magics = {
        "ggml": b"GGML",
        "ggjt": b"ggjt",
        "lowercase": b"gguf",
        "byte_swapped": b"FUGG",
        "zeros": bytes(4),
        "elf": b"\x7fELF",
        "zip": b"PK\x03\x04",
        "nul_in_magic": b"GGU\x00",
    }
    makers: dict[str, Maker] = {k: partial(base.patched, 0, m) for k, m in magics.items()}
    makers["json_text"] = lambda: b'{"model": "not a gguf"}\n'
    makers["magic_then_zeros"] = lambda: MAGIC + bytes(4096)
    versions = {"0": 0, "1": 1, "2": 2, "4": 4, "big_endian_3": 0x03000000, "u32_max": U32_MAX}
    return [
        *_group("magic", makers),
        *_group("version", {k: partial(base.patched, 4, u32(v)) for k, v in versions.items()}),
    ]


def _counts_and_lengths(base: Gguf) -> list[Mutation]:
    first = base.kvs[0]  # general.architecture, a string
    tokens = base.kv("tokenizer.ggml.tokens")
    count_field = tokens.value_start + 4  # past the item type
    first_token = tokens.value_start + 12
    tensor_name = base.tensor("token_embd.weight").start
    counts: dict[str, Maker] = {}
    for field, at, actual in (
        ("tensor_count", 8, len(base.tensors)),
        ("kv_count", 16, len(base.kvs)),
    ):
        values = {"0": 0, "minus_1": actual - 1, "plus_1": actual + 1, "2^32": 2**32, "10^9": 10**9}
        for name, value in (values | HUGE).items():
            counts[f"{field}_{name}"] = partial(base.patched, at, u64(value))
    for name, value in {"0": 0, "plus_1": 32065, "10^9": 10**9, "2^61": 2**61, **HUGE}.items():
        counts[f"token_array_count_{name}"] = partial(base.patched, count_field, u64(value))

    lengths: dict[str, Maker] = {}
    for name, value in {"0": 0, **HUGE}.items():
        lengths[f"first_key_length_{name}"] = partial(base.patched, first.start, u64(value))
        lengths[f"string_value_length_{name}"] = partial(
            base.patched, first.value_start, u64(value)
        )
        lengths[f"tensor_name_length_{name}"] = partial(base.patched, tensor_name, u64(value))
    lengths["string_value_past_the_file"] = partial(
        base.patched, first.value_start, u64(len(base.raw))
    )
    lengths["token_string_length_2^40"] = partial(base.patched, first_token, u64(2**40))
    lengths["token_string_length_u64_max"] = partial(base.patched, first_token, u64(U64_MAX))
    # New keys whose arrays claim more items than the file holds: no items follow.
    for item, count in (
        (ValueType.U8, 10**9),  # a reader that allocates first wants ~32 GiB of values
        (ValueType.U64, 10**9),
        (ValueType.STRING, 10**9),
        (ValueType.ARRAY, 10**9),
        (ValueType.U8, 2**40),
        (ValueType.U64, 2**61),  # 2^61 eight-byte items: the byte count wraps to 0
        (ValueType.U32, 2**62),  # ... and to 0 again
        (ValueType.U8, U64_MAX),
    ):
        payload = u32(item) + u64(count)
        lengths[f"array_of_{count}_{item.name}"] = partial(
            base.with_kv, "x.huge", ValueType.ARRAY, payload
        )
    lengths |= {
        # Present in full, these must load.
        "array_of_10^6_U8": partial(
            base.with_kv, "x.big", ValueType.ARRAY, u32(ValueType.U8) + u64(10**6) + bytes(10**6)
        ),
        "arrays_nested_64_deep": partial(
            base.with_kv, "x.nested", ValueType.ARRAY, nested_arrays(64)
        ),
        "string_of_16_MiB": partial(
            base.with_kv, "x.long", ValueType.STRING, gguf_string(b"x" * 2**24)
        ),
        "key_of_1_MiB": partial(base.with_kv, "k" * 2**20, ValueType.U32, u32(1)),
        "empty_key": partial(base.with_kv, b"", ValueType.U32, u32(1)),
        "empty_tensor_name": partial(base.with_tensor, "output_norm.weight", name=b""),
        "tensor_name_of_1_MiB": partial(base.with_tensor, "output_norm.weight", name=b"n" * 2**20),
        # A recursive reader runs out of stack.
        "arrays_nested_10^5_deep": partial(
            base.with_kv, "x.nested", ValueType.ARRAY, nested_arrays(10**5)
        ),
    }
    return [*_group("counts", counts), *_group("lengths", lengths)]


def _value_types(base: Gguf) -> list[Mutation]:
    type_field = base.kvs[0].value_start - 4
    tokens = base.kv("tokenizer.ggml.tokens")
    makers: dict[str, Maker] = {}
    for name, vtype in {"13": 13, "255": 255, "2^31": 2**31, "u32_max": U32_MAX}.items():
        makers[f"first_value_type_{name}"] = partial(base.patched, type_field, u32(vtype))
        makers[f"token_item_type_{name}"] = partial(base.patched, tokens.value_start, u32(vtype))
    for vtype in (ValueType.ARRAY, ValueType.U64):
        makers[f"token_item_type_{vtype.name}"] = partial(
            base.patched, tokens.value_start, u32(vtype)
        )
    makers["bool_byte_7"] = partial(
        base.with_kv, "tokenizer.ggml.add_bos_token", ValueType.BOOL, b"\x07"
    )
    wrong = {
        "STRING": (ValueType.STRING, gguf_string("2")),
        "F32": (ValueType.F32, scalar(ValueType.F32, 2.0)),
        "F64_nan": (ValueType.F64, scalar(ValueType.F64, math.nan)),
        "I32_minus_1": (ValueType.I32, scalar(ValueType.I32, -1)),
        "I64_min": (ValueType.I64, scalar(ValueType.I64, -(2**63))),
        "BOOL": (ValueType.BOOL, b"\x01"),
        "ARRAY": (ValueType.ARRAY, array(ValueType.U32, [2])),
        "empty_ARRAY": (ValueType.ARRAY, array(ValueType.U32, [])),
    }
    for key in ("phi3.block_count", "phi3.context_length", "phi3.embedding_length"):
        for name, (vtype, payload) in wrong.items():
            makers[f"{key}_as_{name}"] = partial(base.with_kv, key, vtype, payload)
    not_utf8_tokens = [b"\xff\xfe" if i % 1000 == 5 else b"t%d" % i for i in range(32064)]
    for key, vtype, payload in (
        ("general.architecture", ValueType.U32, u32(3)),
        ("general.architecture", ValueType.ARRAY, array(ValueType.STRING, ["phi3"])),
        ("phi3.attention.layer_norm_rms_epsilon", ValueType.STRING, gguf_string("1e-5")),
        ("phi3.rope.freq_base", ValueType.U64, u64(10000)),
        ("tokenizer.ggml.tokens", ValueType.ARRAY, array(ValueType.U32, range(32064))),
        ("tokenizer.ggml.tokens", ValueType.STRING, gguf_string("<unk>")),
        ("tokenizer.ggml.eos_token_id", ValueType.STRING, gguf_string("</s>")),
        ("tokenizer.chat_template", ValueType.U32, u32(0)),
        ("tokenizer.chat_template", ValueType.ARRAY, array(ValueType.STRING, ["{{ x }}"])),
    ):
        makers[f"{key}_as_{ValueType(vtype).name}"] = partial(base.with_kv, key, vtype, payload)
    # Strings that are not UTF-8.
    makers |= {
        "architecture_not_utf8": partial(
            base.with_kv, "general.architecture", ValueType.STRING, gguf_string(b"ph\xffi3\xc0")
        ),
        "key_not_utf8": partial(base.with_kv, b"x.\xff\xfe", ValueType.U32, u32(1)),
        "chat_template_surrogate_bytes": partial(
            base.with_kv,
            "tokenizer.chat_template",
            ValueType.STRING,
            gguf_string(b"{{ '\xed\xa0\x80' }}"),
        ),
        "tensor_name_not_utf8": partial(
            base.with_tensor, "output_norm.weight", name=b"output_norm.\xff"
        ),
        "token_list_not_utf8": partial(
            base.with_kv,
            "tokenizer.ggml.tokens",
            ValueType.ARRAY,
            array(ValueType.STRING, not_utf8_tokens),
        ),
    }
    return _group("value_types", makers)


def _tensor_types(base: Gguf) -> list[Mutation]:
    embd = base.tensor("token_embd.weight")
    codes = {
        "removed_Q4_2": GgmlType.Q4_2_REMOVED,
        "removed_Q4_3": GgmlType.Q4_3_REMOVED,
        "IQ4_NL": GgmlType.IQ4_NL,
        "I8": GgmlType.I8,
        "I32": GgmlType.I32,
        "F64": GgmlType.F64,
        "TQ2_0": GgmlType.TQ2_0,
        "MXFP4": GgmlType.MXFP4,
        "40": 40,
        "1000": 1000,
        "2^31": 2**31,
        "u32_max": U32_MAX,
    }
    makers: dict[str, Maker] = {
        f"embedding_{name}": partial(base.patched, embd.type_field, u32(code))
        for name, code in codes.items()
    }
    attn = "blk.0.attn_output.weight"  # 64 x 64: 4096 values, a multiple of 256 in all
    norm = "blk.0.attn_norm.weight"
    for name, tensor, ggml_type in (
        # K-quant rows are 256 values; these rows are 64 (the total still divides).
        ("Q4_K_rows_of_64", attn, GgmlType.Q4_K),
        ("Q6_K_rows_of_64", attn, GgmlType.Q6_K),
        ("Q8_K_rows_of_64", attn, GgmlType.Q8_K),
        ("Q8_K_embedding", "token_embd.weight", GgmlType.Q8_K),
        ("Q4_K_embedding", "token_embd.weight", GgmlType.Q4_K),
        ("norm_as_Q8_0", norm, GgmlType.Q8_0),
        ("norm_as_Q4_K", norm, GgmlType.Q4_K),
        ("norm_as_F16", norm, GgmlType.F16),
        ("matrix_as_F32", attn, GgmlType.F32),
        ("matrix_as_BF16", attn, GgmlType.BF16),
        ("output_as_Q4_0", "output.weight", GgmlType.Q4_0),
    ):
        makers[name] = partial(base.with_tensor, tensor, ggml_type=ggml_type)
    return _group("tensor_types", makers)


def _dims(base: Gguf) -> list[Mutation]:
    embd = "token_embd.weight"
    q8_0 = base.tensor(embd).ggml_type
    embedding_dims = {
        "0_rows": (64, 0),
        "0_columns": (0, 32064),
        "0_by_0": (0, 0),
        "1d": (64 * 32064,),
        "no_dims": (),
        "3d": (64, 32064, 1),
        "3d_doubled": (64, 32064, 2),
        "5d": (64, 32064, 1, 1, 1),
        "transposed": (32064, 64),
        "product_wraps_to_0": (2**32, 2**32),  # 2^64 elements
        "product_wraps_to_64": (2**63 + 32, 2),  # 2^64 + 64 elements
        "product_past_2^64": (2**40, 2**40, 2),
        "dims_u64_max": (U64_MAX, U64_MAX),
        "rows_2^63": (64, 2**63),
        "vocab_of_10": (64, 10),
        "vocab_plus_1": (64, 32065),
        "hidden_32": (32, 32064),
        "hidden_128": (128, 32064),
    }
    makers: dict[str, Maker] = {
        f"embedding_{name}": partial(base.with_tensor, embd, dims=dims, ggml_type=q8_0)
        for name, dims in embedding_dims.items()
    }
    # Byte sizes that wrap: 2^62 F32 values or 2^63 F16 values are 2^64 bytes.
    for name, dims, ggml_type in (
        ("embedding_bytes_wrap_to_0_F32", (64, 2**56), GgmlType.F32),
        ("embedding_bytes_wrap_to_256_F32", (64, 2**56 + 1), GgmlType.F32),
        ("embedding_bytes_wrap_to_0_F16", (64, 2**57), GgmlType.F16),
    ):
        makers[name] = partial(base.with_tensor, embd, dims=dims, ggml_type=ggml_type)
    n_dims_field = base.tensor(embd).type_field - 2 * 8 - 4
    for name, n_dims in {"1000": 1000, "2^31": 2**31, "u32_max": U32_MAX}.items():
        makers[f"embedding_n_dims_{name}"] = partial(base.patched, n_dims_field, u32(n_dims))
    other_dims: list[tuple[str, tuple[int, ...]]] = [
        ("output.weight", (64, 10)),
        ("output.weight", (64, 32064 * 2)),
        ("blk.0.attn_norm.weight", (63,)),
        ("blk.0.attn_norm.weight", (128,)),
        ("blk.0.attn_norm.weight", (64, 1)),
        ("output_norm.weight", (0,)),
        ("blk.0.attn_qkv.weight", (64, 100)),
        ("blk.0.attn_qkv.weight", (192, 64)),
        ("blk.0.attn_output.weight", (32, 128)),
        ("blk.0.ffn_up.weight", (64, 64)),
        ("blk.0.ffn_up.weight", (64, 255)),
        ("blk.0.ffn_down.weight", (64, 128)),
        ("blk.1.ffn_down.weight", (0, 64)),
    ]
    for tensor, shape in other_dims:
        label = "x".join(map(str, shape))
        makers[f"{tensor}_{label}"] = partial(base.with_tensor, tensor, dims=shape)
    return _group("dims", makers)


def _offsets_and_alignment(base: Gguf) -> list[Mutation]:
    embd = base.tensor("token_embd.weight")
    last = max(base.tensors, key=lambda t: t.offset)
    data_len = len(base.data)
    offsets = {
        "at_end_of_file": data_len,
        "past_end": data_len + 32,
        "2^40": 2**40,
        "2^63": 2**63,
        "u64_max": U64_MAX,
        "wraps_with_data_start": 2**64 - base.data_start,
        "misaligned_by_1": embd.offset + 1,
        "misaligned_by_3": embd.offset + 3,
        "misaligned_by_16": embd.offset + 16,
    }
    offset_makers: dict[str, Maker] = {
        f"embedding_{name}": partial(base.patched, embd.offset_field, u64(offset))
        for name, offset in offsets.items()
    }
    offset_makers |= {
        "last_tensor_past_end": partial(base.patched, last.offset_field, u64(last.offset + 32)),
        "all_tensors_at_0": partial(
            base.rebuilt, tensors=[replace(t, offset=0) for t in base.tensors]
        ),
        "tensors_overlapping": partial(
            base.rebuilt, tensors=[replace(t, offset=t.offset // 64 * 32) for t in base.tensors]
        ),
        "data_section_unpadded": partial(base.rebuilt, alignment=1),
    }
    alignments = {
        "0": (ValueType.U32, 0),  # once a division by zero
        "1": (ValueType.U32, 1),
        "3": (ValueType.U32, 3),
        "48": (ValueType.U32, 48),
        "2^31": (ValueType.U32, 2**31),
        "u32_max": (ValueType.U32, U32_MAX),
        "U64_2^32": (ValueType.U64, 2**32),
        "I32_minus_1": (ValueType.I32, -1),
        "F32_32": (ValueType.F32, 32.0),
    }
    alignment_makers: dict[str, Maker] = {
        name: partial(base.with_kv, "general.alignment", vtype, scalar(vtype, value))
        for name, (vtype, value) in alignments.items()
    }
    alignment_makers["STRING"] = partial(
        base.with_kv, "general.alignment", ValueType.STRING, gguf_string("32")
    )
    # Declared 64, laid out for 32.
    key = KeyValue(b"general.alignment", ValueType.U32, u32(64))
    alignment_makers["64_data_for_32"] = partial(base.rebuilt, kvs=[*base.kvs, key], alignment=32)
    return [*_group("offsets", offset_makers), *_group("alignment", alignment_makers)]


def _hyperparameters(base: Gguf) -> list[Mutation]:
    makers: dict[str, Maker] = {}

    def integers(key: str, values: dict[str, int]) -> None:
        for name, value in values.items():
            vtype = ValueType.U64 if value > U32_MAX else ValueType.U32
            short = key.removeprefix("phi3.")
            makers[f"{short}_{name}"] = partial(base.with_kv, key, vtype, scalar(vtype, value))

    def floats(key: str, values: dict[str, float]) -> None:
        for name, value in values.items():
            short = key.removeprefix("phi3.")
            payload = scalar(ValueType.F32, value)
            makers[f"{short}_{name}"] = partial(base.with_kv, key, ValueType.F32, payload)

    # block_count 2^32 and 10^12 once hung, then aborted.
    integers("phi3.block_count", {"0": 0, "1": 1, "3": 3, "2^31": 2**31, **U32_EDGES})
    integers("phi3.embedding_length", {"0": 0, "1": 1, "63": 63, "128": 128, **U32_EDGES})
    integers("phi3.attention.head_count", {"0": 0, "3": 3, "128": 128, "u32_max": U32_MAX})
    integers("phi3.attention.head_count_kv", {"0": 0, "3": 3, "8": 8, "u32_max": U32_MAX})
    integers("phi3.feed_forward_length", {"0": 0, "127": 127, "u32_max": U32_MAX})
    integers("phi3.context_length", {"0": 0, "1": 1, "2^31": 2**31, **U32_EDGES})
    integers("phi3.rope.dimension_count", {"0": 0, "1": 1, "15": 15, "32": 32, "u32_max": U32_MAX})
    integers("phi3.rope.scaling.original_context_length", {"0": 0, "u32_max": U32_MAX})
    integers("phi3.attention.sliding_window", {"0": 0, "1": 1, "u32_max": U32_MAX})
    integers("tokenizer.ggml.eos_token_id", {"vocab_size": 32064, "u32_max": U32_MAX})
    integers("tokenizer.ggml.bos_token_id", {"vocab_size": 32064, "u32_max": U32_MAX})
    edges = {"0": 0.0, "minus_1": -1.0, "nan": math.nan, "inf": math.inf}
    floats("phi3.rope.freq_base", edges | {"1e-45": 1e-45, "1e38": 1e38})
    floats("phi3.attention.layer_norm_rms_epsilon", edges)
    floats("phi3.rope.scaling.attn_factor", {"nan": math.nan, "0": 0.0, "minus_inf": -math.inf})
    tokens = [f"t{i}" for i in range(32064)]
    for name, items in {
        "tokens_10": tokens[:10],
        "tokens_empty": [],
        "tokens_all_empty_strings": [""] * 32064,
        "tokens_40000": tokens + [f"u{i}" for i in range(7936)],
    }.items():
        payload = array(ValueType.STRING, items)
        makers[name] = partial(base.with_kv, "tokenizer.ggml.tokens", ValueType.ARRAY, payload)
    for name, arch in {
        "llama": "llama",
        "empty": "",
        "nul_inside": "phi3\x00",
        "1_MiB": "p" * 2**20,
    }.items():
        payload = gguf_string(arch)
        makers[f"architecture_{name}"] = partial(
            base.with_kv, "general.architecture", ValueType.STRING, payload
        )
    return _group("hyperparameters", makers)


def _missing_and_duplicated(base: Gguf) -> list[Mutation]:
    keys = (
        "general.architecture",
        "phi3.block_count",
        "phi3.embedding_length",
        "phi3.attention.head_count",
        "phi3.context_length",
        "phi3.rope.dimension_count",
        "tokenizer.ggml.tokens",
    )
    missing: dict[str, Maker] = {key: partial(base.without_kv, key) for key in keys}
    for tensor in ("token_embd.weight", "blk.1.ffn_down.weight", "output_norm.weight"):
        kept = [t for t in base.tensors if t.name != tensor.encode()]
        missing[tensor] = partial(base.rebuilt, tensors=kept)
    missing["all_tensors"] = partial(base.rebuilt, tensors=[], data=b"")
    missing["all_keys"] = partial(base.rebuilt, kvs=[])
    arch = base.kv("general.architecture")
    embd = base.tensor("token_embd.weight")
    blocks = KeyValue(b"phi3.block_count", ValueType.STRING, gguf_string("x"))
    duplicated: dict[str, Maker] = {
        "key_twice_other_value": partial(
            base.rebuilt, kvs=[*base.kvs, replace(arch, payload=gguf_string("llama"))]
        ),
        "key_twice_other_type": partial(base.rebuilt, kvs=[*base.kvs, blocks]),
        "tensor_twice": partial(base.rebuilt, tensors=[*base.tensors, embd]),
        "tensor_twice_other_dims": partial(
            base.rebuilt, tensors=[*base.tensors, replace(embd, dims=(64, 10))]
        ),
    }
    return [*_group("missing", missing), *_group("duplicates", duplicated)]


def _flipped(raw: bytes, positions: Iterable[int], seed: int) -> bytes:
    """``raw`` with each byte at ``positions`` XORed with a random nonzero byte."""
    rng = random.Random(seed)
    out = bytearray(raw)
    for at in positions:
        out[at] ^= rng.randrange(1, 256)
    return bytes(out)


def _header_flips(base: Gguf, rng: random.Random) -> list[Mutation]:
    """Random bytes changed where the reader interprets them (40 files), and anywhere in
    the header (8 files)."""
    spans = base.structural_spans()
    weights = [end - start for start, end in spans]
    makers: dict[str, Maker] = {}
    for i in range(40):
        picked = rng.choices(spans, weights, k=rng.randint(1, 4))
        positions = sorted(rng.randrange(start, end) for start, end in picked)
        name = f"structural_{i}_at_{'_'.join(map(str, positions))}"
        makers[name] = partial(_flipped, base.raw, positions, rng.getrandbits(32))
    for i in range(8):
        positions = sorted(rng.sample(range(base.data_start), rng.randint(1, 16)))
        name = f"anywhere_{i}_{len(positions)}_bytes_from_{positions[0]}"
        makers[name] = partial(_flipped, base.raw, positions, rng.getrandbits(32))
    return _group("header_flips", makers)


def _data_flips(base: Gguf, rng: random.Random) -> list[Mutation]:
    """Random bytes changed in the tensors (16 files), and weights made NaN or infinite."""
    makers: dict[str, Maker] = {}
    for i in range(16):
        positions = sorted(rng.sample(range(base.data_start, len(base.raw)), rng.randint(1, 64)))
        makers[f"random_{i}_{len(positions)}_bytes"] = partial(
            _flipped, base.raw, positions, rng.getrandbits(32)
        )
    norm_start, _ = base.data_bytes("output_norm.weight")
    n_norm = base.tensor("output_norm.weight").dims[0]
    for name, value in {"nan": math.nan, "inf": math.inf, "3e38": 3e38, "zero": 0.0}.items():
        norm = scalar(ValueType.F32, value) * n_norm
        makers[f"output_norm_{name}"] = partial(base.patched, norm_start, norm)
    for tensor in ("token_embd.weight", "output.weight", "blk.0.attn_qkv.weight"):
        for name, bits in {"nan": 0x7E00, "inf": 0x7C00}.items():
            makers[f"{tensor}_scales_{name}"] = partial(_block_scales, base, tensor, 34, bits)
    data_len = len(base.raw) - base.data_start
    makers["all_data_0xff"] = lambda: base.raw[: base.data_start] + b"\xff" * data_len
    return _group("data_flips", makers)


def _block_scales(base: Gguf, name: str, block_bytes: int, f16_bits: int) -> bytes:
    """``name``'s blocks with their leading f16 scale set to ``f16_bits`` (Q8_0: 34-byte
    blocks; Q4_K: 144-byte super-blocks, ``d`` first)."""
    start, end = base.data_bytes(name)
    raw = bytearray(base.raw)
    for block in range(start, end - block_bytes + 1, block_bytes):
        raw[block : block + 2] = struct.pack("<H", f16_bits)
    return bytes(raw)


def malformed_kquant_ggufs(base: Gguf) -> list[Mutation]:
    """Edits of the K-quant fixture: Q4_K, hidden size 256, LongRoPE factors, tied output,
    sliding window."""
    attn = "blk.0.attn_output.weight"  # 256 x 256
    factors = "rope_factors_long.weight"
    factors_start, _ = base.data_bytes(factors)
    n_factors = base.tensor(factors).dims[0]

    def factor_values(value: float) -> Maker:
        return partial(base.patched, factors_start, scalar(ValueType.F32, value) * n_factors)

    def setting(key: str, vtype: ValueType, value: float) -> Maker:
        return partial(base.with_kv, key, vtype, scalar(vtype, value))

    tensor_types: dict[str, Maker] = {
        "attn_output_Q8_K": partial(base.with_tensor, attn, ggml_type=GgmlType.Q8_K),
        "ffn_up_Q8_K": partial(base.with_tensor, "blk.0.ffn_up.weight", ggml_type=GgmlType.Q8_K),
        "embedding_Q8_K": partial(base.with_tensor, "token_embd.weight", ggml_type=GgmlType.Q8_K),
        "attn_output_Q2_K": partial(base.with_tensor, attn, ggml_type=GgmlType.Q2_K),
        "attn_output_Q8_0": partial(base.with_tensor, attn, ggml_type=GgmlType.Q8_0),
    }
    dims: dict[str, Maker] = {
        "attn_output_rows_of_128": partial(base.with_tensor, attn, dims=(128, 512)),
        "rope_factors_one_short": partial(base.with_tensor, factors, dims=(n_factors - 1,)),
        "rope_factors_2d": partial(base.with_tensor, factors, dims=(n_factors // 2, 2)),
        "rope_factors_empty": partial(base.with_tensor, "rope_factors_short.weight", dims=(0,)),
    }
    data: dict[str, Maker] = {
        "rope_factors_nan": factor_values(math.nan),
        "rope_factors_zero": factor_values(0.0),
        "rope_factors_minus_inf": factor_values(-math.inf),
        "embedding_scales_nan": partial(_block_scales, base, "token_embd.weight", 144, 0x7E00),
        "attn_output_scales_inf": partial(_block_scales, base, attn, 144, 0x7C00),
    }
    orig = "phi3.rope.scaling.original_context_length"
    hyper: dict[str, Maker] = {
        "original_context_0": setting(orig, ValueType.U32, 0),
        "original_context_u32_max": setting(orig, ValueType.U32, U32_MAX),
        "attn_factor_nan": setting("phi3.rope.scaling.attn_factor", ValueType.F32, math.nan),
        "attn_factor_minus_1": setting("phi3.rope.scaling.attn_factor", ValueType.F32, -1.0),
        "sliding_window_0": setting("phi3.attention.sliding_window", ValueType.U32, 0),
        "sliding_window_u32_max": setting("phi3.attention.sliding_window", ValueType.U32, U32_MAX),
        "rope_dim_odd": setting("phi3.rope.dimension_count", ValueType.U32, 63),
        "rope_dim_past_head": setting("phi3.rope.dimension_count", ValueType.U32, 128),
    }
    return [
        Mutation(category, f"kquant_{name}", make)
        for category, makers in (
            ("tensor_types", tensor_types),
            ("dims", dims),
            ("data_flips", data),
            ("hyperparameters", hyper),
        )
        for name, make in makers.items()
    ]
