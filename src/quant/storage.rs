//! The bytes of a tensor as the GGUF stores them: a range of the memory-mapped file (no copy;
//! the pages are the OS file cache's), or an owned aligned copy.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result};
use memmap2::Mmap;

#[derive(Debug, Clone)]
pub enum WeightBytes {
    Mapped {
        map: Arc<Mmap>,
        range: Range<usize>,
    },
    /// 8-byte aligned, so any block type can be viewed in it.
    Owned {
        words: Arc<Vec<u64>>,
        len: usize,
    },
}

impl WeightBytes {
    /// A range of the mapping, or an aligned copy of it if the file placed it at an odd
    /// address (GGUF aligns tensor data to 32 bytes by default, so this is rare).
    pub fn mapped(map: Arc<Mmap>, range: Range<usize>) -> Self {
        if (map.as_ptr() as usize + range.start).is_multiple_of(8) {
            WeightBytes::Mapped { map, range }
        } else {
            Self::copied(&map[range])
        }
    }

    pub fn copied(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: the words hold at least `bytes.len()` bytes, and any bytes are valid u64s.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                words.as_mut_ptr() as *mut u8,
                bytes.len(),
            )
        };
        WeightBytes::Owned {
            words: Arc::new(words),
            len: bytes.len(),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            WeightBytes::Mapped { map, range } => &map[range.clone()],
            WeightBytes::Owned { words, len } => {
                // SAFETY: u64s viewed as the bytes they were copied from.
                let all = unsafe {
                    std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 8)
                };
                &all[..*len]
            }
        }
    }
}

/// One tensor of a model file: its type, its shape (outermost first, as Candle orders it)
/// and its bytes, not yet converted to anything.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
    pub bytes: WeightBytes,
}

impl RawTensor {
    pub fn from_qtensor(tensor: &QTensor) -> Result<Self> {
        Ok(Self {
            dtype: tensor.dtype(),
            dims: tensor.shape().dims().to_vec(),
            bytes: WeightBytes::copied(&tensor.data()?),
        })
    }

    /// A Candle quantized tensor holding a copy of the bytes.
    pub fn to_qtensor(&self) -> Result<QTensor> {
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            self.dtype,
            self.bytes.as_bytes(),
            self.dims.clone(),
            &Device::Cpu,
        )
    }
}
