//! How each repacked type's values unpack (`Runs`: Q4_K's nibbles, Q5_K's with a fifth
//! bit, Q6_K's with two) and how a block's exact totals become its rows' sums
//! (`RepackedKernel::finish`: the minimums' or the stored offset's term, then the scaling).

use std::arch::x86_64::*;

use super::super::super::blocks::BlockQ8K;
use super::super::super::repacked::{BlockQ4Kx8, BlockQ5Kx8, BlockQ6Kx8};
use super::super::group_dot::GroupDot;
use super::super::{bits_at_4, load, nibbles, scale_block};
use super::{RepackedKernel, Runs};

/// Each lane's Σ weights·sums over N pairs of i16 weights (`weights[q]`, lane r: row r's)
/// and activation sums (`sums[i][q]` in every lane): the offsets' term, exact.
#[inline(always)]
unsafe fn weighted_sums<const R: usize, const N: usize>(
    weights: [__m256i; N],
    sums: [&[i32; N]; R],
) -> [__m256i; R] {
    let mut total = [_mm256_setzero_si256(); R];
    for (q, w) in weights.into_iter().enumerate() {
        for (total, sums) in total.iter_mut().zip(sums) {
            let pair = _mm256_set1_epi32(sums[q]);
            *total = _mm256_add_epi32(*total, _mm256_madd_epi16(w, pair));
        }
    }
    total
}

#[inline(always)]
unsafe fn load128<T>(ptr: *const T) -> __m128i {
    _mm_loadu_si128(ptr as *const __m128i)
}

/// A Q4_K block's runs: the packed nibbles as they are (`nibbles`), the high ones in place
/// where `in_place`.
pub struct Q4Runs<'a> {
    block: &'a BlockQ4Kx8,
    in_place: bool,
}

impl Runs for Q4Runs<'_> {
    const MAX_VALUE: i32 = 15;
    const SPLITS: usize = 1;
    #[inline(always)]
    fn high_times_16(&self) -> bool {
        self.in_place
    }
    #[inline(always)]
    unsafe fn runs(&self, p: usize, c: usize) -> (__m256i, __m256i) {
        nibbles(load(self.block.qs[p][c].as_ptr()), self.in_place)
    }
    #[inline(always)]
    unsafe fn scale_pair(&self, p: usize, _: usize) -> __m256i {
        _mm256_cvtepu8_epi16(load128(self.block.scales[p].as_ptr()))
    }
}

/// A Q5_K block's runs: Q4_K's (`low4`'s nibbles, shifted down) with bits 2p and 2p+1 of
/// `qh` as their fifth bits.
pub struct Q5Runs<'a> {
    low4: Q4Runs<'a>,
    qh: &'a [[u8; 32]; 8],
}

impl Runs for Q5Runs<'_> {
    const MAX_VALUE: i32 = 31;
    const SPLITS: usize = 1;
    #[inline(always)]
    unsafe fn runs(&self, p: usize, c: usize) -> (__m256i, __m256i) {
        let (lo, hi) = self.low4.runs(p, c);
        let qh = load(self.qh[c].as_ptr());
        let bit = 2 * p as u32;
        (
            _mm256_or_si256(lo, bits_at_4(qh, bit, 0x10)),
            _mm256_or_si256(hi, bits_at_4(qh, bit + 1, 0x10)),
        )
    }
    #[inline(always)]
    unsafe fn scale_pair(&self, p: usize, k: usize) -> __m256i {
        self.low4.scale_pair(p, k)
    }
}

/// A Q6_K block's runs: the nibbles with two bits of `qh` each on top, unsigned (0..64);
/// sub-blocks of 16, so two chains per chunk.
pub struct Q6Runs<'a>(&'a BlockQ6Kx8);

impl Runs for Q6Runs<'_> {
    const MAX_VALUE: i32 = 63;
    const SPLITS: usize = 2;
    #[inline(always)]
    unsafe fn runs(&self, p: usize, c: usize) -> (__m256i, __m256i) {
        let (lo, hi) = nibbles(load(self.0.ql[p][c].as_ptr()), false);
        let qh = load(self.0.qh[p / 2][c].as_ptr());
        let bit = 4 * (p % 2) as u32;
        (
            _mm256_or_si256(lo, bits_at_4(qh, bit, 0x30)),
            _mm256_or_si256(hi, bits_at_4(qh, bit + 2, 0x30)),
        )
    }
    #[inline(always)]
    unsafe fn scale_pair(&self, p: usize, k: usize) -> __m256i {
        _mm256_cvtepi8_epi16(load128(self.0.scales[p][k].as_ptr()))
    }
}

/// Q4_K and Q5_K (`block`, or its `low4`): `d`·Σ scale·q·y − `dmin`·Σ min·sum, per row.
#[inline(always)]
unsafe fn with_minimums<const R: usize>(
    block: &BlockQ4Kx8,
    total: [__m256i; R],
    ys: [&BlockQ8K; R],
    sums: [&[i32; 4]; R],
    acc: &mut [__m256; R],
) {
    let mut mins = [_mm256_setzero_si256(); 4];
    for (wide, pair) in mins.iter_mut().zip(&block.mins) {
        *wide = _mm256_cvtepu8_epi16(load128(pair.as_ptr()));
    }
    let offsets = weighted_sums(mins, sums);
    let d = _mm256_cvtph_ps(load128(block.d.as_ptr()));
    let dmin = _mm256_cvtph_ps(load128(block.dmin.as_ptr()));
    for i in 0..R {
        let yd = _mm256_set1_ps(ys[i].d);
        acc[i] = scale_block(acc[i], total[i], offsets[i], yd, d, dmin, false);
    }
}

impl RepackedKernel for BlockQ4Kx8 {
    const BUFFERED_WITH_EVEX: bool = false;
    type Runs<'a> = Q4Runs<'a>;
    #[inline(always)]
    unsafe fn runs<V: GroupDot>(&self) -> Q4Runs<'_> {
        // VNNI's i32 chains take the high nibbles in place (exact: each product a multiple
        // of 16, each chain below 2^20), shifted down once at the chain's end.
        Q4Runs {
            block: self,
            in_place: V::CHAIN_MAX == i32::MAX,
        }
    }
    #[inline(always)]
    unsafe fn finish<const R: usize>(
        &self,
        total: [__m256i; R],
        ys: [&BlockQ8K; R],
        sums: [&[i32; 4]; R],
        acc: &mut [__m256; R],
    ) {
        with_minimums(self, total, ys, sums, acc)
    }
}

impl RepackedKernel for BlockQ5Kx8 {
    const BUFFERED_WITH_EVEX: bool = true;
    type Runs<'a> = Q5Runs<'a>;
    #[inline(always)]
    unsafe fn runs<V: GroupDot>(&self) -> Q5Runs<'_> {
        let low4 = Q4Runs {
            block: &self.low4,
            in_place: false,
        };
        Q5Runs { low4, qh: &self.qh }
    }
    #[inline(always)]
    unsafe fn finish<const R: usize>(
        &self,
        total: [__m256i; R],
        ys: [&BlockQ8K; R],
        sums: [&[i32; 4]; R],
        acc: &mut [__m256; R],
    ) {
        with_minimums(&self.low4, total, ys, sums, acc)
    }
}

impl RepackedKernel for BlockQ6Kx8 {
    const BUFFERED_WITH_EVEX: bool = true;
    type Runs<'a> = Q6Runs<'a>;
    #[inline(always)]
    unsafe fn runs<V: GroupDot>(&self) -> Q6Runs<'_> {
        Q6Runs(self)
    }
    #[inline(always)]
    unsafe fn finish<const R: usize>(
        &self,
        total: [__m256i; R],
        ys: [&BlockQ8K; R],
        sums: [&[i32; 8]; R],
        acc: &mut [__m256; R],
    ) {
        // The stored offset of 32 times Σ scale·sum, off the values before the one scaling.
        let runs = Q6Runs(self);
        // A loop, not `array::from_fn`, whose closure would not inherit the target features.
        let mut scales = [_mm256_setzero_si256(); 8];
        for (q, scale) in scales.iter_mut().enumerate() {
            *scale = runs.scale_pair(q / 2, q % 2);
        }
        let offsets = weighted_sums(scales, sums);
        let d = _mm256_cvtph_ps(load128(self.d.as_ptr()));
        for i in 0..R {
            let offsets = _mm256_slli_epi32::<5>(offsets[i]);
            let yd = _mm256_set1_ps(ys[i].d);
            acc[i] = scale_block(acc[i], total[i], offsets, yd, d, d, true);
        }
    }
}
