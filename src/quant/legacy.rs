//! Q8_0 and Q4_0 matrices (blocks of 32 values with one f16 scale: most community Phi-3
//! files, and the fallbacks of K-quant files for rows that are not whole 256-value blocks),
//! multiplied in place from the mapped file. Activations are quantized to Q8_0 blocks as
//! llama.cpp and Candle do, so products agree with Candle's up to the order of additions.

use half::f16;
use rayon::prelude::*;

use super::blocks::{as_blocks, WeightBlock};
use super::storage::RawTensor;
use super::{par_row_groups, Kernels, OutPtr, WeightBytes};
use candle_core::quantized::GgmlDType;

/// Values per block.
pub const QK: usize = 32;

/// 8.5 bits per weight: 32 signed values and their scale.
#[repr(C)]
#[derive(Clone)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// 4.5 bits per weight: byte j holds value j in its low nibble and value j + 16 in its
/// high one, each offset by 8.
#[repr(C)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

impl WeightBlock for BlockQ8_0 {}
impl WeightBlock for BlockQ4_0 {}

/// A weight block's values as signed bytes, and its scale.
pub trait LegacyBlock: WeightBlock + Sync {
    fn scale(&self) -> f32;
    fn values(&self) -> [i8; QK];
    /// The scale's bits, for the vector kernels' own conversion.
    fn d(&self) -> f16;
    /// The 32 values as signed bytes in one vector.
    ///
    /// Safety: the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unpack(&self) -> std::arch::x86_64::__m256i;
}

impl LegacyBlock for BlockQ8_0 {
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }

    fn values(&self) -> [i8; QK] {
        self.qs
    }

    fn d(&self) -> f16 {
        self.d
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack(&self) -> std::arch::x86_64::__m256i {
        std::arch::x86_64::_mm256_loadu_si256(self.qs.as_ptr().cast())
    }
}

impl LegacyBlock for BlockQ4_0 {
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }

    fn values(&self) -> [i8; QK] {
        std::array::from_fn(|i| {
            let byte = self.qs[i % 16];
            let nibble = if i < 16 { byte & 0x0F } else { byte >> 4 };
            nibble as i8 - 8
        })
    }

    fn d(&self) -> f16 {
        self.d
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack(&self) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let bytes = _mm_loadu_si128(self.qs.as_ptr().cast());
        let low = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
        let high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
        _mm256_sub_epi8(_mm256_set_m128i(high, low), _mm256_set1_epi8(8))
    }
}

/// Quantizes `xs` (a multiple of 32 long) to Q8_0 as ggml does: scale from the largest
/// magnitude, values rounded half away from zero.
pub fn quantize_q8_0(xs: &[f32], out: &mut [BlockQ8_0]) {
    for (x, block) in xs.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d);
        for (q, &v) in block.qs.iter_mut().zip(x) {
            *q = (v * inverse).round() as i8;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Legacy {
    Q8_0,
    Q4_0,
}

/// Weight rows per group: what stays in L2 while every tile of activations passes (24 rows
/// of 8192 Q8_0 values are 209 KiB, a tile of 16 activation rows 139 KiB).
const GROUP_ROWS: usize = 24;

/// A (rows, cols) Q8_0 or Q4_0 matrix, multiplied as `x · Wᵀ`.
#[derive(Debug)]
pub struct LegacyMatrix {
    bytes: WeightBytes,
    kind: Legacy,
    rows: usize,
    cols: usize,
    kernels: Kernels,
}

impl LegacyMatrix {
    /// `None` for other tensor types, and where Candle's kernels are asked for.
    pub fn new(tensor: &RawTensor, kernels: Kernels) -> Option<Self> {
        let (kind, block_bytes) = match tensor.dtype() {
            GgmlDType::Q8_0 => (Legacy::Q8_0, BlockQ8_0::BYTES),
            GgmlDType::Q4_0 => (Legacy::Q4_0, BlockQ4_0::BYTES),
            _ => return None,
        };
        let &[rows, cols] = tensor.dims() else {
            return None;
        };
        let bytes = tensor.bytes();
        // Checked again (`RawTensor` holds whole blocks) because the tiles read unchecked.
        let sized = cols.is_multiple_of(QK)
            && rows
                .checked_mul(cols / QK)
                .and_then(|n| n.checked_mul(block_bytes))
                == Some(bytes.as_bytes().len());
        let aligned = (bytes.as_bytes().as_ptr() as usize).is_multiple_of(2);
        // Kernels this CPU lacks would be undefined behaviour, not just slow.
        if kernels == Kernels::Candle || !Kernels::available().contains(&kernels) {
            return None;
        }
        (sized && aligned).then(|| Self {
            bytes: bytes.clone(),
            kind,
            rows,
            cols,
            kernels,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `x` is (m, cols) row-major; returns (m, rows).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let blocks = self.cols / QK;
        let mut acts = vec![
            BlockQ8_0 {
                d: f16::ZERO,
                qs: [0; QK]
            };
            m * blocks
        ];
        acts.par_chunks_mut(blocks)
            .zip(x.par_chunks(self.cols))
            .for_each(|(a, x)| quantize_q8_0(x, a));
        let mut out = vec![0f32; m * self.rows];
        let out_ptr = OutPtr(out.as_mut_ptr());
        par_row_groups(self.rows, GROUP_ROWS, |rows| match self.kind {
            Legacy::Q8_0 => self.group::<BlockQ8_0>(rows, &acts, m, out_ptr),
            Legacy::Q4_0 => self.group::<BlockQ4_0>(rows, &acts, m, out_ptr),
        });
        out
    }

    fn group<B: LegacyBlock>(
        &self,
        rows: std::ops::Range<usize>,
        acts: &[BlockQ8_0],
        m: usize,
        out: OutPtr,
    ) {
        let blocks = self.cols / QK;
        let row_bytes = blocks * B::BYTES;
        let bytes = &self.bytes.as_bytes()[rows.start * row_bytes..rows.end * row_bytes];
        let weights: &[B] = as_blocks(bytes).expect("whole, aligned blocks (checked in new)");
        #[cfg(target_arch = "x86_64")]
        {
            use super::x86;
            let group = x86::LegacyGroup {
                weights,
                acts,
                blocks,
                m,
                out,
                rows: rows.clone(),
                stride: self.rows,
            };
            // SAFETY: `Kernels::available` offers each set only where the CPU has it (and
            // `Kernels::selected` only what it offers); the rows hold `blocks` blocks each,
            // the activations `m` rows of them; each task writes only its own rows' outputs.
            match self.kernels {
                Kernels::AvxVnni => return unsafe { x86::legacy_group_avx_vnni(&group) },
                Kernels::Avx512Vnni => return unsafe { x86::legacy_group_avx512_vnni(&group) },
                Kernels::Avx2 => return unsafe { x86::legacy_group_avx2(&group) },
                Kernels::Scalar | Kernels::Candle => {}
            }
        }
        for (j, w) in weights.chunks_exact(blocks).enumerate() {
            for (i, a) in acts.chunks_exact(blocks).enumerate() {
                // SAFETY: in bounds; each task writes only its own rows' outputs.
                unsafe { *out.at(i * self.rows + rows.start + j) = dot(w, a) };
            }
        }
    }
}

/// One weight row · one activation row, portably: each block's integer sum, scaled.
pub fn dot<B: LegacyBlock>(w: &[B], a: &[BlockQ8_0]) -> f32 {
    w.iter()
        .zip(a)
        .map(|(w, a)| {
            let sum: i32 = w
                .values()
                .iter()
                .zip(&a.qs)
                .map(|(&x, &y)| i32::from(x) * i32::from(y))
                .sum();
            sum as f32 * w.scale() * a.d.to_f32()
        })
        .sum()
}
