//! The GGUF header, parsed from the mapped file with every count, length, size and offset
//! checked against what the file can hold before anything is allocated for it.
//!
//! Candle's reader allocates one 32-byte `Value` per array element (a 1 GB array of bytes
//! becomes 32 GB) and divides by `general.alignment` unchecked. This one keeps arrays as
//! views of the file, so what it allocates is bounded by the header's own bytes plus
//! `MAX_TENSORS` and `MAX_METADATA` entries.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::quantized::GgmlDType;

use super::value::{ArrayRef, Value, ValueType};

/// Most tensors a file may declare. Real models have a few hundred to ~1,200 (Llama 3.1
/// 405B); the cap bounds the tensor table whatever the header claims.
pub const MAX_TENSORS: u64 = 1 << 16;
/// Most metadata entries a file may declare (real files have ~40).
pub const MAX_METADATA: u64 = 1 << 16;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// The largest `general.alignment` accepted (a power of two).
pub const MAX_ALIGNMENT: u64 = 1 << 20;
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Why a header is rejected; the caller adds the file's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// The file ends inside the header.
    Truncated(String),
    Invalid(String),
    /// A tensor of a ggml type Candle cannot load.
    UnsupportedType {
        tensor: String,
        code: u32,
    },
}

/// One tensor's type, shape (outermost first, as Candle orders it) and place in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
    /// Absolute byte range of the data in the file, checked to lie inside it.
    pub bytes: Range<usize>,
}

#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    /// Tensor names in file order (error messages and tests want a stable order).
    pub tensor_order: Vec<String>,
    pub data_offset: usize,
}

impl Header {
    /// Parses the header of the GGUF file `data` and checks every tensor's extent.
    pub fn parse(data: &[u8]) -> Result<Header, HeaderError> {
        let mut r = Reader { data, pos: 0 };
        let magic = r.bytes(4, "the magic")?;
        if magic != b"GGUF" {
            return Err(HeaderError::Invalid(format!(
                "it does not start with \"GGUF\" ({magic:02x?})"
            )));
        }
        let version = r.u32("the version")?;
        match version {
            2 | 3 => {}
            1 => return Err(HeaderError::Invalid(
                "it is GGUF version 1, which llama.cpp dropped in 2023; convert the model again"
                    .into(),
            )),
            v if v > 3 && v.swap_bytes() <= 3 => {
                return Err(HeaderError::Invalid(
                    "it is a big-endian GGUF; only little-endian files are supported".into(),
                ))
            }
            v => {
                return Err(HeaderError::Invalid(format!(
                    "GGUF version {v} is not supported (versions 2 and 3 are)"
                )))
            }
        }
        let tensor_count = r.u64("the tensor count")?;
        let metadata_count = r.u64("the metadata count")?;
        if tensor_count > MAX_TENSORS {
            return Err(HeaderError::Invalid(format!(
                "it declares {tensor_count} tensors, more than the {MAX_TENSORS} any model has"
            )));
        }
        if metadata_count > MAX_METADATA {
            return Err(HeaderError::Invalid(format!(
                "it declares {metadata_count} metadata entries, more than the {MAX_METADATA} allowed"
            )));
        }

        let mut metadata = HashMap::new();
        for _ in 0..metadata_count {
            let key = r.string("a metadata key")?;
            let key = String::from_utf8(key)
                .map_err(|_| HeaderError::Invalid("a metadata key is not valid UTF-8".into()))?;
            let code = r.u32(&format!("the type of '{key}'"))?;
            let value = r.value(code, &key)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(HeaderError::Invalid(format!(
                    "the metadata key '{key}' appears twice"
                )));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => a,
                _ => {
                    return Err(HeaderError::Invalid(format!(
                        "general.alignment is {v:?}; it must be a power of two from 1 to {MAX_ALIGNMENT}"
                    )))
                }
            },
        };

        let mut infos = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let name = r.string("a tensor name")?;
            let name = String::from_utf8(name)
                .map_err(|_| HeaderError::Invalid("a tensor name is not valid UTF-8".into()))?;
            let n_dims = r.u32(&format!("the dimension count of '{name}'"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(HeaderError::Invalid(format!(
                    "tensor '{name}' has {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}"
                )));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(r.u64(&format!("a dimension of '{name}'"))?);
            }
            let code = r.u32(&format!("the type of '{name}'"))?;
            let offset = r.u64(&format!("the offset of '{name}'"))?;
            let Some(dtype) = tensor_type(code) else {
                return Err(HeaderError::UnsupportedType { tensor: name, code });
            };
            infos.push((name, ne, dtype, offset));
        }
        let data_offset = align(r.pos as u64, alignment)
            .ok_or_else(|| HeaderError::Invalid("the tensor data offset overflows".into()))?;

        let file_size = data.len() as u64;
        let mut tensors = HashMap::with_capacity(infos.len());
        let mut tensor_order = Vec::with_capacity(infos.len());
        for (name, ne, dtype, offset) in infos {
            let bytes = tensor_extent(&name, &ne, dtype, offset, alignment)?;
            let start = data_offset.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(bytes));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(HeaderError::Invalid(format!(
                    "tensor '{name}' lies past any possible end of file"
                )));
            };
            if end > file_size {
                return Err(HeaderError::Truncated(format!(
                    "tensor '{name}' ends at byte {end}, but the file has only {file_size} bytes"
                )));
            }
            // In memory: the file is mapped whole, so these fit a usize.
            let info = TensorInfo {
                dtype,
                dims: ne.iter().rev().map(|&d| d as usize).collect(),
                bytes: start as usize..end as usize,
            };
            if tensors.insert(name.clone(), info).is_some() {
                return Err(HeaderError::Invalid(format!(
                    "the tensor name '{name}' appears twice"
                )));
            }
            tensor_order.push(name);
        }
        Ok(Header {
            version,
            metadata,
            tensors,
            tensor_order,
            data_offset: data_offset as usize,
        })
    }
}

fn align(pos: u64, alignment: u64) -> Option<u64> {
    pos.checked_next_multiple_of(alignment)
}

/// The byte size of a tensor, with its shape and offset checked.
fn tensor_extent(
    name: &str,
    ne: &[u64],
    dtype: GgmlDType,
    offset: u64,
    alignment: u64,
) -> Result<u64, HeaderError> {
    let invalid = |detail: String| HeaderError::Invalid(format!("tensor '{name}' {detail}"));
    let block = dtype.block_size() as u64;
    // Rows (the innermost dimension) are whole blocks, as ggml requires.
    if !ne[0].is_multiple_of(block) {
        return Err(invalid(format!(
            "has rows of {} values, not a multiple of the {block}-value blocks of {dtype:?}",
            ne[0]
        )));
    }
    let elements = ne
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| invalid(format!("has dimensions {ne:?} whose product overflows")))?;
    let bytes = (elements / block)
        .checked_mul(dtype.type_size() as u64)
        .ok_or_else(|| invalid(format!("has dimensions {ne:?} whose byte size overflows")))?;
    if !offset.is_multiple_of(alignment) {
        return Err(invalid(format!(
            "starts at offset {offset}, not a multiple of the file's alignment {alignment}"
        )));
    }
    Ok(bytes)
}

/// The ggml tensor types Candle loads. Q8_1 and Q8_K are ggml's activation formats, which
/// no converter writes for weights; the others are listed by name in errors.
fn tensor_type(code: u32) -> Option<GgmlDType> {
    Some(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Names of ggml tensor types, as llama.cpp numbers them, for messages.
pub fn ggml_type_name(code: u32) -> Option<&'static str> {
    Some(match code {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// A cursor over the header bytes: every read is checked against the end of the file.
pub(super) struct Reader<'a> {
    pub(super) data: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], HeaderError> {
        if n > self.remaining() {
            return Err(HeaderError::Truncated(format!(
                "its header ends inside {what} (at byte {})",
                self.pos
            )));
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], HeaderError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, HeaderError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, HeaderError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A length-prefixed string's bytes, trailing NULs dropped (some writers add them).
    pub(super) fn string_slice(&mut self, what: &str) -> Result<&'a [u8], HeaderError> {
        let len = self.length(1, what)?;
        let mut bytes = self.bytes(len, what)?;
        while let [rest @ .., 0] = bytes {
            bytes = rest;
        }
        Ok(bytes)
    }

    fn string(&mut self, what: &str) -> Result<Vec<u8>, HeaderError> {
        self.string_slice(what).map(<[u8]>::to_vec)
    }

    /// A u64 count of items of at least `min_item` bytes each, checked against what is left
    /// of the file before anything is allocated for them.
    fn length(&mut self, min_item: usize, what: &str) -> Result<usize, HeaderError> {
        let n = self.u64(what)?;
        let remaining = self.remaining() as u64;
        match n.checked_mul(min_item as u64) {
            Some(bytes) if bytes <= remaining => Ok(n as usize),
            _ => Err(HeaderError::Truncated(format!(
                "{what} claims {n} items, more than the {remaining} bytes left in the file hold"
            ))),
        }
    }

    fn value(&mut self, code: u32, key: &str) -> Result<Value, HeaderError> {
        let what = format!("the value of '{key}'");
        let Some(kind) = ValueType::from_code(code) else {
            return Err(HeaderError::Invalid(format!(
                "metadata key '{key}' has the unknown value type {code}"
            )));
        };
        Ok(match kind {
            ValueType::U8 => Value::U8(self.array::<1>(&what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(&what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            ValueType::U32 => Value::U32(self.u32(&what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            ValueType::U64 => Value::U64(self.u64(&what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            ValueType::Bool => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(HeaderError::Invalid(format!(
                        "metadata key '{key}' is a bool of value {b}, not 0 or 1"
                    )))
                }
            },
            ValueType::String => Value::String(self.string(&what)?),
            ValueType::Array => {
                let code = self.u32(&what)?;
                let item = ValueType::from_code(code).ok_or_else(|| {
                    HeaderError::Invalid(format!(
                        "metadata array '{key}' has the unknown item type {code}"
                    ))
                })?;
                let min_item = match item {
                    ValueType::Array => {
                        return Err(HeaderError::Invalid(format!(
                        "metadata key '{key}' is an array of arrays, which GGUF models do not use"
                    )))
                    }
                    ValueType::String => 8,
                    fixed => fixed.fixed_size().unwrap_or(1),
                };
                let len = self.length(min_item, &what)?;
                let start = self.pos;
                match item.fixed_size() {
                    Some(size) => {
                        self.bytes(len * size, &what)?;
                    }
                    None => {
                        for _ in 0..len {
                            let n = self.length(1, &what)?;
                            self.bytes(n, &what)?;
                        }
                    }
                }
                Value::Array(ArrayRef {
                    item,
                    len,
                    bytes: start..self.pos,
                })
            }
        })
    }
}
