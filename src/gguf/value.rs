//! GGUF metadata values: scalars parsed, arrays left where they lie in the file.

use std::ops::Range;

use super::header::Reader;

/// The type of a metadata value, as GGUF numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    pub(super) fn from_code(code: u32) -> Option<Self> {
        use ValueType::*;
        Some(match code {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Bytes of one value of a fixed-size type.
    pub fn fixed_size(self) -> Option<usize> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }
}

/// A metadata value. Strings keep their bytes (GGUF does not promise UTF-8); arrays stay
/// in the file and are read through `ArrayRef`.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(Vec<u8>),
    Array(ArrayRef),
}

impl Value {
    /// The value as a non-negative integer, whatever its integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(u64::from(v)),
            Value::U16(v) => Some(u64::from(v)),
            Value::U32(v) => Some(u64::from(v)),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn is_integer(&self) -> bool {
        matches!(
            self,
            Value::U8(_)
                | Value::I8(_)
                | Value::U16(_)
                | Value::I16(_)
                | Value::U32(_)
                | Value::I32(_)
                | Value::U64(_)
                | Value::I64(_)
        )
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(f64::from(v)),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A string value that is valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }

    /// What kind of value this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Bool(_) => "a bool",
            Value::F32(_) | Value::F64(_) => "a float",
            _ => "an integer",
        }
    }
}

/// An array of one item type, left where it lies in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayRef {
    pub item: ValueType,
    pub len: usize,
    /// The items' bytes (after the type and count).
    pub bytes: Range<usize>,
}

impl ArrayRef {
    /// The items of a string array, as bytes (their lengths were checked at parse); none
    /// for another item type. `data` is the file the header was parsed from.
    pub fn strings<'a>(&self, data: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut r = Reader {
            data: &data[..self.bytes.end],
            pos: self.bytes.start,
        };
        let len = if self.item == ValueType::String {
            self.len
        } else {
            0
        };
        (0..len).map_while(move |_| r.string_slice("").ok())
    }

    /// The items of a numeric array as f64 (integers and floats alike); none for another
    /// item type.
    pub fn numbers<'a>(&self, data: &'a [u8]) -> impl Iterator<Item = f64> + 'a {
        let item = self.item;
        let size = match item {
            ValueType::Bool | ValueType::String | ValueType::Array => None,
            fixed => fixed.fixed_size(),
        };
        let bytes = match size {
            Some(_) => &data[self.bytes.clone()],
            None => &data[0..0],
        };
        bytes
            .chunks_exact(size.unwrap_or(1))
            .map(move |b| number(item, b))
    }
}

fn number(item: ValueType, b: &[u8]) -> f64 {
    let mut buf = [0u8; 8];
    let n = b.len().min(8);
    buf[..n].copy_from_slice(&b[..n]);
    match item {
        ValueType::U8 => f64::from(b[0]),
        ValueType::I8 => f64::from(b[0] as i8),
        ValueType::U16 => f64::from(u16::from_le_bytes([b[0], b[1]])),
        ValueType::I16 => f64::from(i16::from_le_bytes([b[0], b[1]])),
        ValueType::U32 => f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ValueType::I32 => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ValueType::F32 => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ValueType::U64 => u64::from_le_bytes(buf) as f64,
        ValueType::I64 => i64::from_le_bytes(buf) as f64,
        ValueType::F64 => f64::from_le_bytes(buf),
        ValueType::Bool | ValueType::String | ValueType::Array => f64::NAN,
    }
}
