//! Float weight matrices (F32, F16, BF16) multiplied in place from the mapped file, each
//! value converted to f32 in registers as it is used: no f32 copy (Candle's `QMatMul`
//! dequantizes an F16 file to twice its size, on top of its own copy of the bytes), and a
//! load that is only the mapping.

use half::{bf16, f16};

use super::storage::{RawTensor, WeightBytes};
use super::{par_row_groups, readable, Kernels, OutPtr};
use candle_core::quantized::GgmlDType;

/// How a float matrix stores its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatFormat {
    F32,
    F16,
    BF16,
}

impl FloatFormat {
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::F32 => Some(Self::F32),
            GgmlDType::F16 => Some(Self::F16),
            GgmlDType::BF16 => Some(Self::BF16),
            _ => None,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// Row `bytes` (little-endian values of this format) as f32.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        let n = out.len();
        match self {
            Self::F32 => {
                for (o, b) in out.iter_mut().zip(bytes[..4 * n].chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Self::F16 => {
                for (o, b) in out.iter_mut().zip(bytes[..2 * n].chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Self::BF16 => {
                for (o, b) in out.iter_mut().zip(bytes[..2 * n].chunks_exact(2)) {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
        }
    }
}

/// Weight rows per group: what stays in L2 while every activation tile passes (48 rows of
/// 3072 f16 values are 288 KiB).
const GROUP_ROWS: usize = 48;

/// A (rows, cols) float weight matrix, multiplied as `x · Wᵀ`.
#[derive(Debug)]
pub struct FloatMatrix {
    bytes: WeightBytes,
    format: FloatFormat,
    rows: usize,
    cols: usize,
    /// The AVX2 tiles; else the portable loop.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    simd: bool,
    /// The tiles in AVX-512's 16 lanes, for every pass of this matrix (so a row's sums are
    /// the same bits alone or in a batch): where the kernels are AVX-512 VNNI's. On the
    /// Xeon VM, a 512-token prompt of the 8-layer F16 file: 7.3-7.6 s -> 6.6-6.7 (with 512
    /// columns a pass).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    wide: bool,
}

impl FloatMatrix {
    /// `None` for other tensor types, and where Candle's kernels are asked for.
    pub fn new(tensor: &RawTensor, kernels: Kernels) -> Option<Self> {
        let format = FloatFormat::of(tensor.dtype())?;
        let (rows, cols) = readable(tensor, kernels, 1, format.bytes(), format.bytes())?;
        // Every kernel set but the portable one needs AVX2, FMA and F16C, which the tiles use.
        let simd = kernels != Kernels::Scalar && cols.is_multiple_of(8);
        let wide = simd && kernels == Kernels::Avx512Vnni && cols.is_multiple_of(16);
        Some(Self {
            bytes: tensor.bytes().clone(),
            format,
            rows,
            cols,
            simd,
            wide,
        })
    }

    /// `x` is (m, cols) row-major; returns (m, rows).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        // The tiles read `m` rows of `x` unchecked.
        assert!(
            x.len() >= m * self.cols,
            "{m} activation rows of {}",
            self.cols
        );
        let mut out = vec![0f32; m * self.rows];
        let out_ptr = OutPtr(out.as_mut_ptr());
        par_row_groups(self.rows, GROUP_ROWS, |rows| {
            self.group(rows, x, m, out_ptr)
        });
        out
    }

    /// Weight rows `rows` (at most `GROUP_ROWS`) with every activation row, into `out`.
    fn group(&self, rows: std::ops::Range<usize>, x: &[f32], m: usize, out: OutPtr) {
        let row_bytes = self.cols * self.format.bytes();
        let weights = &self.bytes.as_bytes()[rows.start * row_bytes..rows.end * row_bytes];
        #[cfg(target_arch = "x86_64")]
        if self.simd {
            // SAFETY: `simd` is only set where the kernels chosen need AVX2, FMA and F16C
            // (`Kernels::available`), and for whole vectors of columns; `wide` only where
            // they are AVX-512 VNNI's, which need AVX-512F too (`has_avx512_vnni`), and for
            // whole 16-lane vectors; the weights are the rows' bytes; each task writes only
            // its own rows' outputs.
            return unsafe {
                super::x86::float_group(&super::x86::FloatGroup {
                    format: self.format,
                    weights,
                    cols: self.cols,
                    x,
                    m,
                    out,
                    rows,
                    stride: self.rows,
                    wide: self.wide,
                })
            };
        }
        let mut w = vec![0f32; self.cols];
        for (j, row) in weights.chunks_exact(row_bytes).enumerate() {
            self.format.decode(row, &mut w);
            for (i, x) in x.chunks_exact(self.cols).take(m).enumerate() {
                let dot = w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
                // SAFETY: in bounds; each task writes only its own rows' outputs.
                unsafe { *out.at(i * self.rows + rows.start + j) = dot };
            }
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}
