//! The 32-value blocks of ggml's first quantization types, as the file stores them: each
//! block's values as bytes for the integer products, with the block's scale and minimum.
//!
//! Q8_0's values are signed. The others' are read unsigned (the nibbles, with Q5's fifth
//! bit), their offset taken off in integers afterwards (Q4_0's Σ (q − 8) · y is
//! Σ q · y − 8 Σ y): `vpdpbusd` and `maddubs` take an unsigned operand, so those products
//! need no sign juggling.

use half::f16;

use super::super::blocks::WeightBlock;

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

/// 5 bits per weight: Q4_1's nibbles (unsigned, d · q + m).
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// 5.5 bits per weight: Q4_0's nibbles, with bit i of `qh` (little-endian) as value i's
/// fifth bit; values offset by 16.
#[repr(C)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 6 bits per weight: Q5_0's values, unsigned (d · q + m).
#[repr(C)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

impl BlockQ8_0 {
    /// Σ q: what the weights' integer offsets multiply.
    pub fn q_sum(&self) -> i32 {
        self.qs.iter().map(|&q| i32::from(q)).sum()
    }

    /// d · Σ q (given Σ q): what a stored minimum multiplies.
    pub fn d_sum(&self, q_sum: i32) -> f32 {
        q_sum as f32 * self.d.to_f32()
    }
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);

impl WeightBlock for BlockQ8_0 {}
impl WeightBlock for BlockQ4_0 {}
impl WeightBlock for BlockQ4_1 {}
impl WeightBlock for BlockQ5_0 {}
impl WeightBlock for BlockQ5_1 {}

/// Eight activation rows' Q8_0 blocks of one block column, interleaved for `vpdpbusd`:
/// bytes 32g + 4r .. 32g + 4r + 4 are row r's values 4g .. 4g + 4, so one instruction
/// multiplies four weights (broadcast) with eight rows, and the eight sums come out as the
/// eight lanes of one vector.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(32))]
pub struct BlockQ8_0x8 {
    pub qs: [i8; 8 * QK],
    /// Each row's scale.
    pub d: [f32; 8],
    /// Each row's Σ q times the weights' `k` (below): taken off the integer products.
    pub offsets: [i32; 8],
    /// Each row's d · Σ q, for the weights' stored minimums.
    pub ds: [f32; 8],
}

#[cfg(target_arch = "x86_64")]
impl BlockQ8_0x8 {
    /// `rows` interleaved, for weights whose integer products exceed the true ones by `k`
    /// · Σ q: 128 for Q8_0's (shifted to unsigned), 8 for Q4_0's nibbles (q − 8), 16 for
    /// Q5_0's, 0 for the others.
    pub fn interleave(rows: [&BlockQ8_0; 8], k: i32) -> Self {
        let mut qs = [0i8; 8 * QK];
        for (r, row) in rows.iter().enumerate() {
            for g in 0..QK / 4 {
                qs[32 * g + 4 * r..][..4].copy_from_slice(&row.qs[4 * g..4 * g + 4]);
            }
        }
        let sums = rows.map(BlockQ8_0::q_sum);
        Self {
            qs,
            d: rows.map(|row| row.d.to_f32()),
            offsets: sums.map(|s| k * s),
            ds: std::array::from_fn(|r| rows[r].d_sum(sums[r])),
        }
    }
}

/// A weight block as `d · q + m` per value, with `m` = the stored minimum (Q4_1, Q5_1) or
/// `OFFSET` · d (Q4_0, Q5_0), or none (Q8_0).
pub trait LegacyBlock: WeightBlock + Sync {
    /// Whether the values are signed (Q8_0) rather than unsigned (0..31).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const SIGNED: bool = false;
    /// What the values are offset by, in units of d: 0 or minus a power of two.
    const OFFSET: i32 = 0;
    /// The largest value as the kernels take it (unsigned, or the magnitude for Q8_0).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const MAX_VALUE: i32;
    /// Whether the block stores a minimum.
    const STORED_MIN: bool = false;
    /// By how many times each activation block's Σ q the interleaved kernels' integer
    /// products exceed the true ones: Q8_0's weights are shifted by +128 to be unsigned,
    /// Q4_0's and Q5_0's are read without their offset.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const EXCESS: i32 = if Self::SIGNED { 128 } else { -Self::OFFSET };
    fn values(&self) -> [i8; QK];
    /// The scale, as stored (the vector kernels convert it themselves).
    fn d(&self) -> f16;
    /// The stored minimum (zero for the types without one).
    fn m_bits(&self) -> f16 {
        f16::ZERO
    }
    /// The 32 values as bytes in one vector, in order.
    ///
    /// Safety: the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unpack(&self) -> std::arch::x86_64::__m256i;
}

/// Value i of a block whose byte j holds values j (low nibble) and j + 16 (high nibble).
fn nibble(qs: &[u8; QK / 2], i: usize) -> u8 {
    let byte = qs[i % 16];
    if i < 16 {
        byte & 0x0F
    } else {
        byte >> 4
    }
}

/// Value i's fifth bit, as 16 or 0.
fn fifth_bit(qh: &[u8; 4], i: usize) -> u8 {
    (((u32::from_le_bytes(*qh) >> i) & 1) as u8) << 4
}

impl LegacyBlock for BlockQ8_0 {
    const SIGNED: bool = true;
    const MAX_VALUE: i32 = 128;

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
    const OFFSET: i32 = -8;
    const MAX_VALUE: i32 = 15;

    fn values(&self) -> [i8; QK] {
        std::array::from_fn(|i| nibble(&self.qs, i) as i8)
    }

    fn d(&self) -> f16 {
        self.d
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack(&self) -> std::arch::x86_64::__m256i {
        x86::nibbles(&self.qs)
    }
}

impl LegacyBlock for BlockQ4_1 {
    const STORED_MIN: bool = true;
    const MAX_VALUE: i32 = 15;

    fn values(&self) -> [i8; QK] {
        std::array::from_fn(|i| nibble(&self.qs, i) as i8)
    }

    fn d(&self) -> f16 {
        self.d
    }

    fn m_bits(&self) -> f16 {
        self.m
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack(&self) -> std::arch::x86_64::__m256i {
        x86::nibbles(&self.qs)
    }
}

impl LegacyBlock for BlockQ5_0 {
    const OFFSET: i32 = -16;
    const MAX_VALUE: i32 = 31;

    fn values(&self) -> [i8; QK] {
        std::array::from_fn(|i| (nibble(&self.qs, i) | fifth_bit(&self.qh, i)) as i8)
    }

    fn d(&self) -> f16 {
        self.d
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack(&self) -> std::arch::x86_64::__m256i {
        x86::five_bits(&self.qs, &self.qh)
    }
}

impl LegacyBlock for BlockQ5_1 {
    const STORED_MIN: bool = true;
    const MAX_VALUE: i32 = 31;

    fn values(&self) -> [i8; QK] {
        std::array::from_fn(|i| (nibble(&self.qs, i) | fifth_bit(&self.qh, i)) as i8)
    }

    fn d(&self) -> f16 {
        self.d
    }

    fn m_bits(&self) -> f16 {
        self.m
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn unpack(&self) -> std::arch::x86_64::__m256i {
        x86::five_bits(&self.qs, &self.qh)
    }
}

/// Unpacking with AVX2; each function is inlined into a caller that enables it.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::QK;

    /// The 32 nibbles in value order: low nibbles first, then high ones.
    #[inline(always)]
    pub unsafe fn nibbles(qs: &[u8; QK / 2]) -> __m256i {
        // The 16 bytes in both halves, the upper half shifted down a nibble, one mask: one
        // operation fewer than masking, shifting and masking the halves, then joining them.
        let bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(qs.as_ptr().cast()));
        let shifted = _mm256_srlv_epi64(bytes, _mm256_set_epi64x(4, 4, 0, 0));
        _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F))
    }

    /// The 32 five-bit values: the nibbles with their fifth bits from `qh`.
    #[inline(always)]
    pub unsafe fn five_bits(qs: &[u8; QK / 2], qh: &[u8; 4]) -> __m256i {
        let high = _mm256_and_si256(bit_mask(qh), _mm256_set1_epi8(16));
        _mm256_or_si256(nibbles(qs), high)
    }

    /// Byte i all ones where bit i of `qh` (little-endian) is set, else zero.
    #[inline(always)]
    unsafe fn bit_mask(qh: &[u8; 4]) -> __m256i {
        let bits = _mm256_set1_epi32(i32::from_le_bytes(*qh));
        // Bytes 8k..8k+8 each take byte k of the 32 bits...
        let spread = _mm256_shuffle_epi8(
            bits,
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        // ...and byte 8k + b every bit but b set: all ones exactly where bit b is set.
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1))
    }
}
