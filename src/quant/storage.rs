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

    /// Drops the mapped pages of these bytes from this process's memory, where a copy
    /// (`repacked`) takes their place: the file cache keeps them, and a later read would
    /// fault them back in. Nothing for owned bytes, or where the system cannot.
    pub fn release(&self) {
        #[cfg(unix)]
        if let WeightBytes::Mapped { map, range } = self {
            // SAFETY: a read-only mapping of the file: its dropped pages read back as the
            // file's bytes, which are what they held.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    range.start,
                    range.len(),
                )
            };
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
/// and its bytes, not yet converted to anything. The bytes always match the shape: the
/// kernels rely on it.
#[derive(Debug, Clone)]
pub struct RawTensor {
    dtype: GgmlDType,
    dims: Vec<usize>,
    bytes: WeightBytes,
}

impl RawTensor {
    /// Checks that `bytes` holds exactly the whole blocks of `dims` in `dtype`.
    pub fn new(
        dtype: GgmlDType,
        dims: Vec<usize>,
        bytes: WeightBytes,
    ) -> std::result::Result<Self, String> {
        let block = dtype.block_size();
        let row = dims.last().copied().unwrap_or(1);
        if !row.is_multiple_of(block) {
            return Err(format!(
                "rows of {row} values are not whole {block}-value blocks of {dtype:?}"
            ));
        }
        let expected = dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| (n / block).checked_mul(dtype.type_size()));
        let found = bytes.as_bytes().len();
        if expected != Some(found) {
            return Err(format!(
                "{found} bytes do not hold a {dims:?} tensor of {dtype:?}"
            ));
        }
        Ok(Self { dtype, dims, bytes })
    }

    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// The shape, outermost first.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    pub fn bytes(&self) -> &WeightBytes {
        &self.bytes
    }

    pub fn from_qtensor(tensor: &QTensor) -> Result<Self> {
        Self::new(
            tensor.dtype(),
            tensor.shape().dims().to_vec(),
            WeightBytes::copied(&tensor.data()?),
        )
        .map_err(candle_core::Error::msg)
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
