//! How each K-quant block unpacks and meets Q8_K activation blocks with AVX2: the scales
//! and minimums (`prepare`), and the values of each 32, as u8 (`chunk`, `runs`), which the
//! grouped kernels (`k_groups.rs`) unpack the same way. Q4_K and Q5_K (sub-blocks of 32 with
//! minimums) share their products, and so do Q6_K, Q3_K and Q2_K (sub-blocks of 16).

use std::arch::x86_64::*;

use super::super::blocks::BlockQ8K;
use super::super::blocks::{scale_words, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K};
use super::{f32_of, load, Avx2Block, MulAdd, Prepared};

/// A block's unpacked weights, one sub-block of 32 per row.
#[repr(C, align(32))]
pub struct Unpacked(pub [[u8; 32]; 8]);

impl Unpacked {
    /// Q4_K's or Q5_K's values from its chunks (`chunk(c)`: sub-blocks 2c and 2c+1).
    #[inline(always)]
    pub(super) unsafe fn of_chunks(chunk: impl Fn(usize) -> (__m256i, __m256i)) -> Self {
        let mut values = Unpacked([[0; 32]; 8]);
        for c in 0..4 {
            let (lo, hi) = chunk(c);
            _mm256_store_si256(values.0[2 * c].as_mut_ptr() as *mut __m256i, lo);
            _mm256_store_si256(values.0[2 * c + 1].as_mut_ptr() as *mut __m256i, hi);
        }
        values
    }

    /// A block of 16-value sub-blocks' values in order, 32 a row.
    #[inline(always)]
    pub(super) unsafe fn of_runs<B: SixteenBlock>(block: &B) -> Self {
        let mut values = Unpacked([[0; 32]; 8]);
        for h in 0..2 {
            for (run, q) in block.runs(h).into_iter().enumerate() {
                _mm256_store_si256(values.0[4 * h + run].as_mut_ptr() as *mut __m256i, q);
            }
        }
        values
    }
}

/// `vpshufb` masks that repeat one i16 lane (of eight) across each 128-bit half.
static LANE_BROADCAST: [[u8; 32]; 8] = {
    let mut masks = [[0u8; 32]; 8];
    let mut lane = 0;
    while lane < 8 {
        let mut i = 0;
        while i < 32 {
            masks[lane][i] = (2 * lane + i % 2) as u8;
            i += 1;
        }
        lane += 1;
    }
    masks
};

/// Masks giving i16 lane 2p in the low half and lane 2p+1 in the high half: the scales of
/// the two 16-value Q6_K sub-blocks that 32 values span.
static PAIR_BROADCAST: [[u8; 32]; 4] = {
    let mut masks = [[0u8; 32]; 4];
    let mut p = 0;
    while p < 4 {
        let mut i = 0;
        while i < 32 {
            let lane = 2 * p + i / 16;
            masks[p][i] = (2 * lane + i % 2) as u8;
            i += 1;
        }
        p += 1;
    }
    masks
};

/// Q4_K's and Q5_K's eight 6-bit scales then their eight minimums, as sixteen i16 lanes:
/// sub-blocks 2c and 2c+1 are i32 lane c (scales) and 4 + c (minimums).
#[inline(always)]
pub(super) unsafe fn widened_scales_and_mins(packed: &[u8; 12]) -> __m256i {
    let [scales_lo, scales_hi, mins_lo, mins_hi] = scale_words(packed);
    let bytes = _mm_set_epi32(
        mins_hi as i32,
        mins_lo as i32,
        scales_hi as i32,
        scales_lo as i32,
    );
    _mm256_cvtepu8_epi16(bytes)
}

/// Q4_K/Q5_K: the 6-bit scales (both halves) and the minimums, doubled to weigh the
/// activation's 16-value sums.
#[inline(always)]
unsafe fn prepare_k(packed: &[u8; 12], d: f32, dmin: f32) -> Prepared {
    let unpacked = widened_scales_and_mins(packed);
    let mins = _mm256_extracti128_si256(unpacked, 1);
    Prepared {
        scales: _mm256_permute2x128_si256(unpacked, unpacked, 0x00),
        offset_weights: _mm256_set_m128i(
            _mm_unpackhi_epi16(mins, mins),
            _mm_unpacklo_epi16(mins, mins),
        ),
        d,
        dm: dmin,
    }
}

/// Q4_K and Q5_K differ only in how chunk c's 64 values are unpacked into its low-nibble
/// and high-nibble halves (`unpack`).
#[inline(always)]
unsafe fn k_quant_dots<A: MulAdd, const R: usize>(
    p: &Prepared,
    ys: [&BlockQ8K; R],
    unpack: impl Fn(usize) -> (__m256i, __m256i),
) -> [__m256i; R] {
    // Two chains per row, so the multiply-adds do not wait on each other.
    let mut lo_sums = [_mm256_setzero_si256(); R];
    let mut hi_sums = [_mm256_setzero_si256(); R];
    for c in 0..4 {
        let (lo, hi) = unpack(c);
        let scale_lo = _mm256_shuffle_epi8(p.scales, load(LANE_BROADCAST[2 * c].as_ptr()));
        let scale_hi = _mm256_shuffle_epi8(p.scales, load(LANE_BROADCAST[2 * c + 1].as_ptr()));
        for r in 0..R {
            let y = ys[r].qs.as_ptr().add(64 * c);
            lo_sums[r] = A::mul_add(lo_sums[r], _mm256_maddubs_epi16(lo, load(y)), scale_lo);
            hi_sums[r] = A::mul_add(
                hi_sums[r],
                _mm256_maddubs_epi16(hi, load(y.add(32))),
                scale_hi,
            );
        }
    }
    let mut out = lo_sums;
    for r in 0..R {
        out[r] = _mm256_add_epi32(lo_sums[r], hi_sums[r]);
    }
    out
}

/// Q4_K and Q5_K share their scales' layout and products; only `chunk` differs.
macro_rules! k_quant_avx2_block {
    ($($block:ty),*) => {$(
        impl Avx2Block for $block {
            #[inline(always)]
            unsafe fn prepare(&self) -> Prepared {
                prepare_k(&self.scales, f32_of(self.d), f32_of(self.dmin))
            }

            #[inline(always)]
            unsafe fn dots<A: MulAdd, const R: usize>(
                &self,
                p: &Prepared,
                ys: [&BlockQ8K; R],
            ) -> [__m256i; R] {
                k_quant_dots::<A, R>(p, ys, |c| self.chunk(c))
            }
        }
    )*};
}

k_quant_avx2_block!(BlockQ4K, BlockQ5K);

/// The low four bits of each byte of `bytes`, and the high four: shifted down, or with
/// `in_place` left where they are (16 times their value, for VNNI's i32 chains, which shift
/// their total down once at the chain's end).
#[inline(always)]
pub(super) unsafe fn nibbles(bytes: __m256i, in_place: bool) -> (__m256i, __m256i) {
    let low4 = _mm256_set1_epi8(0x0F);
    let high = if in_place {
        _mm256_and_si256(bytes, _mm256_set1_epi8(0xF0u8 as i8))
    } else {
        _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), low4)
    };
    (_mm256_and_si256(bytes, low4), high)
}

/// Bits `from..` of each byte of `v` moved to bit 4 on, where `mask` selects them (Q5_K's
/// fifth bits, Q6_K's fifth and sixth). 16-bit shifts by at most 4 carry no bit across bytes
/// into bits 4..8.
#[inline(always)]
pub(super) unsafe fn bits_at_4(v: __m256i, from: u32, mask: i8) -> __m256i {
    let moved = if from >= 4 {
        _mm256_srl_epi16(v, _mm_cvtsi32_si128(from as i32 - 4))
    } else {
        _mm256_sll_epi16(v, _mm_cvtsi32_si128(4 - from as i32))
    };
    _mm256_and_si256(moved, _mm256_set1_epi8(mask))
}

impl BlockQ4K {
    /// Chunk c's 64 values as u8: byte j holds value 64c + j in its low nibble and
    /// 64c + 32 + j in its high one.
    #[inline(always)]
    pub(super) unsafe fn chunk(&self, c: usize) -> (__m256i, __m256i) {
        nibbles(load(self.qs.as_ptr().add(32 * c)), false)
    }
}

impl BlockQ5K {
    /// As Q4_K's chunks, with bits 2c and 2c+1 of qh[j] as the fifth bits.
    #[inline(always)]
    pub(super) unsafe fn chunk(&self, c: usize) -> (__m256i, __m256i) {
        // One shift by a count in a register for both bits: with `bits_at_4` (a shift chosen
        // by `c`) this path measured 40 times slower, 15.5 ms a 4096×3072 pass against 0.4.
        let one = _mm256_set1_epi8(1);
        let (lo, hi) = nibbles(load(self.qs.as_ptr().add(32 * c)), false);
        let qh = _mm256_srl_epi16(load(self.qh.as_ptr()), _mm_cvtsi32_si128(2 * c as i32));
        let fifth_lo = _mm256_slli_epi16(_mm256_and_si256(qh, one), 4);
        let fifth_hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4);
        (_mm256_or_si256(lo, fifth_lo), _mm256_or_si256(hi, fifth_hi))
    }
}

/// Q6_K, Q3_K and Q2_K: 16 sub-blocks of 16 values with 8-bit scales, the values stored
/// unsigned. What they stand for is `d·scale·(q − 2^OFFSET_BITS)` (Q6_K, Q3_K: the offset
/// comes off in integers before the one scaling) or `d·scale·q − dmin·min` (Q2_K, with
/// `MINIMUMS`: the minimums' term scaled on its own, as Q4_K's). They differ only in how
/// their scales and values unpack.
pub(super) trait SixteenBlock {
    const MINIMUMS: bool = false;
    const OFFSET_BITS: i32 = 0;
    /// Whether a lane's sum over a sub-block (16 values, each at most 128 in magnitude
    /// times the largest stored value) fits an i16: Q3_K's (7) and Q2_K's (3), not Q6_K's.
    const SUMS_FIT_I16: bool = false;
    /// The largest stored value (unsigned).
    const MAX_VALUE: i32;
    /// The block's factors `d` and `dmin` (Safety: the CPU has F16C).
    unsafe fn factors(&self) -> (f32, f32);
    /// The 16 sub-blocks' scales and (with `MINIMUMS`) minimums, a byte each, unpacked in
    /// vector registers: in scalar code, eight rows' worth of them (decoding) exhausts the
    /// registers.
    unsafe fn scale_vectors(&self) -> (__m128i, __m128i);
    /// Half h's four runs of 32 values (values 128h + 32·run + l), unsigned.
    unsafe fn runs(&self, h: usize) -> [__m256i; 4];
}

impl SixteenBlock for BlockQ6K {
    const OFFSET_BITS: i32 = 5;
    const MAX_VALUE: i32 = 63;

    #[inline(always)]
    unsafe fn factors(&self) -> (f32, f32) {
        (f32_of(self.d), 0.0)
    }

    #[inline(always)]
    unsafe fn scale_vectors(&self) -> (__m128i, __m128i) {
        let scales = _mm_loadu_si128(self.scales.as_ptr() as *const __m128i);
        (scales, _mm_setzero_si128())
    }

    #[inline(always)]
    unsafe fn runs(&self, h: usize) -> [__m256i; 4] {
        self.q6k_runs(h)
    }
}

impl SixteenBlock for BlockQ3K {
    const OFFSET_BITS: i32 = 2;
    const SUMS_FIT_I16: bool = true;
    const MAX_VALUE: i32 = 7;

    #[inline(always)]
    unsafe fn factors(&self) -> (f32, f32) {
        (f32_of(self.d), 0.0)
    }

    /// As `BlockQ3K::signed_scales`: the low nibbles of bytes 0..8 then their high nibbles,
    /// each with two bits of bytes 8..12 on top, less 32.
    #[inline(always)]
    unsafe fn scale_vectors(&self) -> (__m128i, __m128i) {
        let p = &self.scales;
        let low = _mm_loadl_epi64(p.as_ptr() as *const __m128i);
        let top = _mm_cvtsi32_si128(i32::from_le_bytes([p[8], p[9], p[10], p[11]]));
        let low4 = _mm_set1_epi8(0x0F);
        let bits01 = _mm_set1_epi8(0x03);
        // Nibbles: sub-blocks 0..8 in the low half, 8..16 in the high one.
        let nibbles = _mm_and_si128(_mm_unpacklo_epi64(low, _mm_srli_epi16(low, 4)), low4);
        // Top bits of sub-block s: bits 2(s / 4) of byte 8 + s % 4.
        let tops = _mm_shuffle_epi32::<0>(top);
        let top_bits = _mm_unpacklo_epi64(
            _mm_unpacklo_epi32(tops, _mm_srli_epi16::<2>(tops)),
            _mm_unpacklo_epi32(_mm_srli_epi16::<4>(tops), _mm_srli_epi16::<6>(tops)),
        );
        let top_bits = _mm_and_si128(top_bits, bits01);
        let scales = _mm_or_si128(nibbles, _mm_slli_epi16(top_bits, 4));
        (_mm_sub_epi8(scales, _mm_set1_epi8(32)), _mm_setzero_si128())
    }

    /// Run r of half h: bits 2r..2r+2 of qs[32h + l], and bit 4h + r of hmask[l] as the
    /// third (4).
    #[inline(always)]
    unsafe fn runs(&self, h: usize) -> [__m256i; 4] {
        let hmask = load(self.hmask.as_ptr());
        let four = _mm256_set1_epi8(0x04);
        let low = two_bit_runs(&self.qs, h);
        std::array::from_fn(|r| {
            let bit = _mm256_set1_epi8((1u8 << (4 * h + r)) as i8);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(hmask, bit), bit);
            _mm256_or_si256(low[r], _mm256_and_si256(set, four))
        })
    }
}

impl SixteenBlock for BlockQ2K {
    const MINIMUMS: bool = true;
    const SUMS_FIT_I16: bool = true;
    const MAX_VALUE: i32 = 3;

    #[inline(always)]
    unsafe fn factors(&self) -> (f32, f32) {
        (f32_of(self.d), f32_of(self.dmin))
    }

    #[inline(always)]
    unsafe fn runs(&self, h: usize) -> [__m256i; 4] {
        two_bit_runs(&self.qs, h)
    }

    #[inline(always)]
    unsafe fn scale_vectors(&self) -> (__m128i, __m128i) {
        let packed = _mm_loadu_si128(self.scales.as_ptr() as *const __m128i);
        let low4 = _mm_set1_epi8(0x0F);
        (
            _mm_and_si128(packed, low4),
            _mm_and_si128(_mm_srli_epi16(packed, 4), low4),
        )
    }
}

/// Q2_K's values and Q3_K's low two bits: run r of half h is bits 2r..2r+2 of
/// qs[32h + l].
#[inline(always)]
unsafe fn two_bit_runs(qs: &[u8; 64], h: usize) -> [__m256i; 4] {
    let q = load(qs.as_ptr().add(32 * h));
    let bits01 = _mm256_set1_epi8(0x03);
    std::array::from_fn(|r| {
        _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * r as i32)), bits01)
    })
}

/// Q6_K, Q3_K and Q2_K share their products; only their unpacking differs.
macro_rules! sixteen_avx2_block {
    ($($block:ty),*) => {$(
        impl Avx2Block for $block {
            const OFFSETS_SCALED_BY_D: bool = !<$block as SixteenBlock>::MINIMUMS;

            #[inline(always)]
            unsafe fn prepare(&self) -> Prepared {
                sixteen_prepare(self)
            }

            #[inline(always)]
            unsafe fn dots<A: MulAdd, const R: usize>(
                &self,
                p: &Prepared,
                ys: [&BlockQ8K; R],
            ) -> [__m256i; R] {
                sixteen_dots::<A, _, R>(self, p, ys)
            }
        }
    )*};
}

sixteen_avx2_block!(BlockQ6K, BlockQ3K, BlockQ2K);

#[inline(always)]
unsafe fn sixteen_prepare<B: SixteenBlock>(block: &B) -> Prepared {
    let (scales, mins) = block.scale_vectors();
    let scales = _mm256_cvtepi8_epi16(scales);
    let (d, dmin) = block.factors();
    if B::MINIMUMS {
        Prepared {
            scales,
            offset_weights: _mm256_cvtepi8_epi16(mins),
            d,
            dm: dmin,
        }
    } else {
        // Values stored with their offset: its term is offset·Σ scale·bsum, weighed by d.
        Prepared {
            scales,
            offset_weights: _mm256_sll_epi16(scales, _mm_cvtsi32_si128(B::OFFSET_BITS)),
            d,
            dm: d,
        }
    }
}

#[inline(always)]
unsafe fn sixteen_dots<A: MulAdd, B: SixteenBlock, const R: usize>(
    block: &B,
    p: &Prepared,
    ys: [&BlockQ8K; R],
) -> [__m256i; R] {
    let mut sums = [[_mm256_setzero_si256(); R]; 2];
    for h in 0..2 {
        // Sub-blocks 8h..8h+8, as i16 in both halves, for the pair shuffles.
        let half_scales = if h == 0 {
            _mm256_permute2x128_si256(p.scales, p.scales, 0x00)
        } else {
            _mm256_permute2x128_si256(p.scales, p.scales, 0x11)
        };
        for (run, q) in block.runs(h).into_iter().enumerate() {
            let scale = _mm256_shuffle_epi8(half_scales, load(PAIR_BROADCAST[run].as_ptr()));
            for r in 0..R {
                let y = ys[r].qs.as_ptr().add(128 * h + 32 * run);
                let chain = &mut sums[run % 2][r];
                *chain = A::mul_add(*chain, _mm256_maddubs_epi16(q, load(y)), scale);
            }
        }
    }
    let mut out = sums[0];
    for r in 0..R {
        out[r] = _mm256_add_epi32(sums[0][r], sums[1][r]);
    }
    out
}

impl BlockQ6K {
    /// Half h's four runs of 32 values (values 128h + 32·run + l), 0..64 unsigned: ql's low
    /// nibbles, the next 32 bytes' low nibbles, then the high nibbles, each with two bits of
    /// qh on top.
    #[inline(always)]
    unsafe fn q6k_runs(&self, h: usize) -> [__m256i; 4] {
        let low4 = _mm256_set1_epi8(0x0F);
        let bits01 = _mm256_set1_epi8(0x03);
        let bits45 = _mm256_set1_epi8(0x30);
        let ql0 = load(self.ql.as_ptr().add(64 * h));
        let ql1 = load(self.ql.as_ptr().add(64 * h + 32));
        let qh = load(self.qh.as_ptr().add(32 * h));
        [
            _mm256_or_si256(
                _mm256_and_si256(ql0, low4),
                _mm256_slli_epi16(_mm256_and_si256(qh, bits01), 4),
            ),
            _mm256_or_si256(
                _mm256_and_si256(ql1, low4),
                _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), bits01), 4),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                _mm256_and_si256(qh, bits45),
            ),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                _mm256_and_si256(_mm256_srli_epi16(qh, 2), bits45),
            ),
        ]
    }
}
