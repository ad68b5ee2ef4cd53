//! The header parser on hand-built headers: each limit, and every truncation of a valid one.

use super::{Header, HeaderError, Value, ValueType};

/// A GGUF v3 header under construction.
#[derive(Default)]
struct Builder {
    kv: Vec<u8>,
    kv_count: u64,
    tensors: Vec<u8>,
    tensor_count: u64,
}

impl Builder {
    fn key(&mut self, key: &str, type_code: u32) -> &mut Vec<u8> {
        self.kv_count += 1;
        put_str(&mut self.kv, key.as_bytes());
        self.kv.extend(type_code.to_le_bytes());
        &mut self.kv
    }

    fn u32(mut self, key: &str, v: u32) -> Self {
        self.key(key, 4).extend(v.to_le_bytes());
        self
    }

    fn string(mut self, key: &str, v: &[u8]) -> Self {
        put_str(self.key(key, 8), v);
        self
    }

    /// An array header claiming `len` items of `item`, followed by `payload`.
    fn array(mut self, key: &str, item: u32, len: u64, payload: &[u8]) -> Self {
        let kv = self.key(key, 9);
        kv.extend(item.to_le_bytes());
        kv.extend(len.to_le_bytes());
        kv.extend(payload);
        self
    }

    fn tensor(mut self, name: &str, ne: &[u64], dtype: u32, offset: u64) -> Self {
        self.tensor_count += 1;
        put_str(&mut self.tensors, name.as_bytes());
        self.tensors.extend((ne.len() as u32).to_le_bytes());
        for d in ne {
            self.tensors.extend(d.to_le_bytes());
        }
        self.tensors.extend(dtype.to_le_bytes());
        self.tensors.extend(offset.to_le_bytes());
        self
    }

    /// The file: header, padding to 32 bytes, then `data` bytes of tensor data.
    fn build(&self, data: usize) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.tensor_count.to_le_bytes());
        out.extend(self.kv_count.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.tensors);
        out.resize(out.len().next_multiple_of(32) + data, 0);
        out
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s);
}

fn valid() -> Builder {
    Builder::default()
        .string("general.architecture", b"phi3")
        .u32("phi3.block_count", 1)
        .array(
            "tokenizer.ggml.tokens",
            8,
            2,
            b"\x01\0\0\0\0\0\0\0a\x02\0\0\0\0\0\0\0bc",
        )
        .array("tokenizer.ggml.scores", 6, 2, &[0, 0, 128, 63, 0, 0, 0, 64])
        .tensor("a.weight", &[32, 2], 0, 0)
        .tensor("b.weight", &[32], 8, 256)
}

fn invalid(bytes: &[u8]) -> String {
    match Header::parse(bytes) {
        Err(HeaderError::Invalid(detail)) => detail,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn a_valid_header_parses_with_arrays_left_in_place() {
    let bytes = valid().build(256 + 34);
    let header = Header::parse(&bytes).unwrap();
    assert_eq!(header.version, 3);
    assert_eq!(
        header.metadata["general.architecture"].as_str(),
        Some("phi3")
    );
    let Value::Array(tokens) = &header.metadata["tokenizer.ggml.tokens"] else {
        panic!("tokens")
    };
    assert_eq!(tokens.item, ValueType::String);
    let tokens: Vec<&[u8]> = tokens.strings(&bytes).collect();
    assert_eq!(tokens, [b"a".as_slice(), b"bc"]);
    let Value::Array(scores) = &header.metadata["tokenizer.ggml.scores"] else {
        panic!("scores")
    };
    assert_eq!(scores.numbers(&bytes).collect::<Vec<_>>(), [1.0, 2.0]);
    let a = &header.tensors["a.weight"];
    assert_eq!(a.dims, [2, 32]);
    assert_eq!(a.bytes.len(), 256);
    assert_eq!(header.tensors["b.weight"].bytes.len(), 34);
    assert_eq!(header.tensor_order, ["a.weight", "b.weight"]);
}

#[test]
fn every_cut_of_a_valid_file_is_truncated_never_a_panic() {
    let bytes = valid().build(256 + 34);
    for keep in 0..bytes.len() {
        match Header::parse(&bytes[..keep]) {
            Err(HeaderError::Truncated(_)) => {}
            Err(HeaderError::Invalid(d)) if keep < 4 => assert!(d.contains("GGUF"), "{d}"),
            other => panic!("cut at {keep}: {other:?}"),
        }
    }
}

#[test]
fn counts_and_lengths_are_checked_before_allocating() {
    let mut bytes = valid().build(290);
    // tensor count, then metadata count, right after magic and version.
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(invalid(&bytes).contains("tensors"));
    let mut bytes = valid().build(290);
    bytes[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(invalid(&bytes).contains("metadata"));

    // A billion one-byte items in a small file: refused from the count alone.
    let huge = Builder::default().array("big", 0, 1_000_000_000, &[1, 2, 3]);
    assert!(matches!(
        Header::parse(&huge.build(0)),
        Err(HeaderError::Truncated(d)) if d.contains("1000000000")
    ));
    let long_string = Builder::default().array("s", 8, 1, &u64::MAX.to_le_bytes());
    assert!(matches!(
        Header::parse(&long_string.build(0)),
        Err(HeaderError::Truncated(_))
    ));
    let nested = Builder::default().array("n", 9, 1, &[0; 12]);
    assert!(invalid(&nested.build(0)).contains("array of arrays"));
    let unknown = Builder::default().array("u", 99, 0, &[]);
    assert!(invalid(&unknown.build(0)).contains("99"));
}

#[test]
fn alignment_must_be_a_sane_power_of_two() {
    for bad in [0, 3, 48, 1 << 30] {
        let b = valid().u32("general.alignment", bad);
        assert!(
            invalid(&b.build(1024)).contains("general.alignment"),
            "{bad}"
        );
    }
    let b = valid().u32("general.alignment", 64);
    let header = Header::parse(&b.build(4096)).unwrap();
    assert_eq!(header.data_offset % 64, 0);
}

#[test]
fn tensor_shapes_types_and_offsets_are_checked() {
    let cases: [(Builder, &str); 7] = [
        (
            valid().tensor("wrap", &[1 << 32, 1 << 32, 1 << 32, 2], 0, 512),
            "overflows",
        ),
        (valid().tensor("row", &[64, 4], 12, 512), "256-value blocks"),
        (
            valid().tensor("dims", &[1, 1, 1, 1, 1], 0, 512),
            "dimensions",
        ),
        (valid().tensor("none", &[], 0, 512), "dimensions"),
        (valid().tensor("odd", &[8], 0, 33), "alignment"),
        (valid().tensor("a.weight", &[8], 0, 512), "twice"),
        (valid().u32("phi3.block_count", 2), "twice"),
    ];
    for (builder, expected) in cases {
        let detail = invalid(&builder.build(1 << 12));
        assert!(detail.contains(expected), "{detail}");
    }
    // Data past the end of the file.
    let b = valid().tensor("far", &[8], 0, u64::MAX - 31);
    assert!(Header::parse(&b.build(1024)).is_err());
    let b = valid().tensor("past", &[1024], 0, 512);
    assert!(matches!(
        Header::parse(&b.build(1024)),
        Err(HeaderError::Truncated(d)) if d.contains("past")
    ));
    // Q8_K (an activation format) and IQ types are named, not loaded.
    for code in [15, 20, 1000] {
        let b = valid().tensor("q", &[256], code, 512);
        assert!(matches!(
            Header::parse(&b.build(4096)),
            Err(HeaderError::UnsupportedType { tensor, code: c }) if tensor == "q" && c == code
        ));
    }
}

#[test]
fn versions_and_bools_are_checked() {
    let mut bytes = valid().build(290);
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(invalid(&bytes).contains("version 1"));
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(invalid(&bytes).contains("big-endian"));
    bytes[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert!(invalid(&bytes).contains("version 7"));
    let mut b = valid();
    b.key("flag", 7).push(2);
    assert!(invalid(&b.build(290)).contains("bool"));
}

/// A small deterministic generator, so the flips are the same on every run.
fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

#[test]
fn random_byte_flips_never_panic() {
    let bytes = valid().build(290);
    let mut state = 7;
    for _ in 0..20_000 {
        let mut mutated = bytes.clone();
        for _ in 0..=(lcg(&mut state) % 4) {
            let at = (lcg(&mut state) as usize) % mutated.len();
            mutated[at] = lcg(&mut state) as u8;
        }
        let _ = Header::parse(&mutated);
    }
}
