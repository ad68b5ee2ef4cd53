//! The VNNI tiles in AVX-512's 512-bit registers: activation rows interleaved sixteen to a
//! vector (`BlockQ8Kx16`), so that one `vpdpbusd` multiplies four broadcast weights with
//! the same positions of sixteen rows, twice the rows of the 256-bit kernels in `k_groups.rs`
//! per instruction. Cores with two 512-bit multiply-add ports (Intel's Xeons) run as many
//! of these per cycle as of the 256-bit ones; Zen 4 splits each into two halves, so there
//! it saves instructions, not multiply-adds.
//!
//! A weight block is unpacked once for a tile's four groups (64 rows, the tile's
//! `TILE_ACTS`), each broadcast serving all four. A sub-block's products go into two chains
//! per group, its halves: for Q4_K each half's lane sums 16 products below 16·128, which
//! fit an i16, so one `vpdpwssd` applies the scale to both halves (as Q3_K's and Q2_K's
//! 16-value sub-blocks pair up); the others multiply their sums by the scale.
//!
//! The totals are exact integers and each lane (row) is then scaled with the same float
//! operations as every other kernel's (`scale_block`): a row's products are the same bits
//! whichever kernel, group or batch it goes through.

use std::arch::x86_64::*;

use super::super::blocks::BlockQ8Kx16;
use super::super::blocks::{scales_and_mins, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K};
use super::super::kquant::TILE_ROWS;
use super::{f32_of, prefetch, prefetch_next_tile, SixteenBlock, Unpacked};

/// Groups of sixteen rows in a tile, which one unpacking of a weight block serves.
const GROUPS: usize = 4;

/// A K-quant block that can be multiplied with groups of sixteen activation rows.
pub trait WideBlock {
    /// `acc[g]` (lane r: the group's row r) += this block · group g's rows.
    unsafe fn sixteens<const G: usize>(&self, ys: [&BlockQ8Kx16; G], acc: &mut [__m512; G]);
}

/// `out[j * m + i]` = weight row j · activation row i, for the rows of `groups` below `m`
/// (group g holds rows 16g..16g+16).
///
/// Safety: the CPU has AVX-512 F, BW, VL and VNNI besides AVX2, FMA and F16C
/// (`has_avx512_vnni`); every row of `w` has the same number of blocks, each group at least
/// as many; at most `TILE_ROWS` rows and four groups.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn tile_sixteens<B: WideBlock>(
    w: &[&[B]],
    groups: &[&[BlockQ8Kx16]],
    m: usize,
    out: &mut [f32],
) {
    let n = groups.len();
    let mut acc = [_mm512_setzero_ps(); TILE_ROWS * GROUPS];
    let blocks = w.first().map_or(0, |row| row.len());
    // What the unchecked indexing below relies on.
    debug_assert!(w.len() <= TILE_ROWS && n <= GROUPS);
    debug_assert!(w.iter().all(|row| row.len() == blocks));
    debug_assert!(groups.iter().all(|g| g.len() >= blocks));
    if n == 1 {
        // One group (the rows of a pass's last tile, past its whole tiles): the weights
        // stream from memory, row by row, prefetched as in `tile`.
        for (j, row) in w.iter().enumerate() {
            for (b, x) in row.iter().enumerate() {
                prefetch(x);
                group_products(x, groups, b, acc.as_mut_ptr().add(j * GROUPS));
            }
        }
    } else {
        for b in 0..blocks {
            for (j, row) in w.iter().enumerate() {
                let x = row.get_unchecked(b);
                prefetch_next_tile(x, blocks);
                group_products(x, groups, b, acc.as_mut_ptr().add(j * GROUPS));
            }
        }
    }
    for j in 0..w.len() {
        for g in 0..n {
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc[j * GROUPS + g]);
            let at = BlockQ8Kx16::ROWS * g;
            // A padded group's rows past `m` are dropped.
            let rows = BlockQ8Kx16::ROWS.min(m.saturating_sub(at));
            out[j * m + at..j * m + at + rows].copy_from_slice(&lanes[..rows]);
        }
    }
}

/// Weight block `x` (block column `b`) with every group, into `acc[g]`. A function, not a
/// closure, so that it inherits the caller's target features.
#[inline(always)]
unsafe fn group_products<B: WideBlock>(
    x: &B,
    groups: &[&[BlockQ8Kx16]],
    b: usize,
    acc: *mut __m512,
) {
    let y = |g: usize| groups.get_unchecked(g).get_unchecked(b);
    match groups.len() {
        4 => x.sixteens([y(0), y(1), y(2), y(3)], &mut *(acc as *mut [__m512; 4])),
        3 => x.sixteens([y(0), y(1), y(2)], &mut *(acc as *mut [__m512; 3])),
        2 => x.sixteens([y(0), y(1)], &mut *(acc as *mut [__m512; 2])),
        _ => x.sixteens([y(0)], &mut *(acc as *mut [__m512; 1])),
    }
}

/// The unpacked values, kept in memory: left to itself, the compiler holds them in
/// registers and broadcasts each four with two shuffles on the port that half the 512-bit
/// multiply-adds need (70% slower for one group), where a broadcast from memory is a load.
#[inline(always)]
fn opaque(values: &mut Unpacked) -> &Unpacked {
    std::hint::black_box(values)
}

/// Four weights (from `at`) in every lane.
#[inline(always)]
unsafe fn broadcast4(at: *const u8) -> __m512i {
    _mm512_set1_epi32(std::ptr::read_unaligned(at as *const i32))
}

/// Group `y`'s vector `k`: values 4k..4k+4 of each row.
#[inline(always)]
unsafe fn values_of(y: &BlockQ8Kx16, k: usize) -> __m512i {
    _mm512_load_si512(y.qs.get_unchecked(k).as_ptr() as *const _)
}

/// Runs `first` and `first + 1` of a block's unpacked values (32 each) with every group, as
/// the sums of their halves (16 values each): `sums[run][half][g]`. The two runs' sixteen
/// chains (four groups) go side by side: with one run's eight, each waited on the one
/// before (a 4-deep chain of 5-cycle multiply-adds against 16 cycles of issue).
#[inline(always)]
unsafe fn run_pair_sums<const G: usize>(
    values: &Unpacked,
    first: usize,
    ys: [&BlockQ8Kx16; G],
) -> [[[__m512i; G]; 2]; 2] {
    let mut sums = [[[_mm512_setzero_si512(); G]; 2]; 2];
    for k in 0..4 {
        for (r, run) in sums.iter_mut().enumerate() {
            for (h, half) in run.iter_mut().enumerate() {
                let w = broadcast4(values.0[first + r].as_ptr().add(16 * h + 4 * k));
                // Values 32·run + 16h + 4k.. of the block: the groups' vector of them.
                let at = 8 * (first + r) + 4 * h + k;
                for g in 0..G {
                    half[g] = _mm512_dpbusd_epi32(half[g], w, values_of(ys[g], at));
                }
            }
        }
    }
    sums
}

/// `total + lo·scale_lo + hi·scale_hi` per lane, exact, the two scales the i16 halves of
/// each of `pair`'s lanes. With `fit_i16` (every lane of both fits an i16) they go as the
/// halves of each lane into one `vpdpwssd`.
#[inline(always)]
unsafe fn add_scaled(
    total: __m512i,
    lo: __m512i,
    hi: __m512i,
    pair: __m512i,
    fit_i16: bool,
) -> __m512i {
    if fit_i16 {
        let both = _mm512_mask_blend_epi16(0xAAAA_AAAA, lo, _mm512_slli_epi32::<16>(hi));
        _mm512_dpwssd_epi32(total, both, pair)
    } else {
        // Each scale sign-extended to the whole lane.
        let scale_lo = _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(pair));
        let scale_hi = _mm512_srai_epi32::<16>(pair);
        let lo = _mm512_mullo_epi32(lo, scale_lo);
        let hi = _mm512_mullo_epi32(hi, scale_hi);
        _mm512_add_epi32(total, _mm512_add_epi32(lo, hi))
    }
}

/// `add_scaled`'s pair for i32 lane `p` of `i16s` (sub-block weights widened two to a lane,
/// as `x86::group_dot::scale_pair` takes them), in every lane.
#[inline(always)]
unsafe fn wide_pair(i16s: __m256i, p: usize) -> __m512i {
    _mm512_permutexvar_epi32(_mm512_set1_epi32(p as i32), _mm512_castsi256_si512(i16s))
}

/// Each lane's Σ weight(s)·sum(s) over its row's sub-block sums (`sums[q]`: sub-blocks 2q
/// and 2q+1 as i16 pairs), exact: the minimums' term, or the stored offsets'. `pair(q)`:
/// the weights of sub-blocks 2q and 2q+1 as the i16 halves of every lane.
#[inline(always)]
unsafe fn weighted_sums(sums: &[[i16; 32]], pair: impl Fn(usize) -> __m512i) -> __m512i {
    let mut total = _mm512_setzero_si512();
    for (q, pairs) in sums.iter().enumerate() {
        let sums = _mm512_loadu_si512(pairs.as_ptr() as *const _);
        total = _mm512_add_epi32(total, _mm512_madd_epi16(sums, pair(q)));
    }
    total
}

/// `scale_block` (x86/mod.rs) on sixteen lanes: the same operations per lane, so the same
/// bits as the 256-bit kernels.
#[inline(always)]
unsafe fn scale_block(
    acc: __m512,
    dots: __m512i,
    offsets: __m512i,
    yd: __m512,
    (d, dm): (f32, f32),
    offsets_by_d: bool,
) -> __m512 {
    let (d, dm) = (_mm512_set1_ps(d), _mm512_set1_ps(dm));
    if offsets_by_d {
        let values = _mm512_cvtepi32_ps(_mm512_sub_epi32(dots, offsets));
        _mm512_fmadd_ps(values, _mm512_mul_ps(yd, d), acc)
    } else {
        let acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(yd, d), acc);
        _mm512_fnmadd_ps(_mm512_cvtepi32_ps(offsets), _mm512_mul_ps(yd, dm), acc)
    }
}

/// Q4_K and Q5_K (sub-blocks of 32 with minimums), from the unpacked values. `FOUR_BITS`:
/// the values are below 16, so a half sub-block's lane sums fit an i16.
#[inline(always)]
unsafe fn k_quant_sixteens<const G: usize, const FOUR_BITS: bool>(
    values: &Unpacked,
    packed: &[u8; 12],
    factors: (f32, f32),
    ys: [&BlockQ8Kx16; G],
    acc: &mut [__m512; G],
) {
    let (scales, mins) = scales_and_mins(packed);
    let mut total = [_mm512_setzero_si512(); G];
    for pair in 0..4 {
        let sums = run_pair_sums(values, 2 * pair, ys);
        for (half_sums, &scale) in sums.iter().zip(&scales[2 * pair..]) {
            let scale = i16::from(scale);
            for g in 0..G {
                let [lo, hi] = [half_sums[0][g], half_sums[1][g]];
                total[g] = if FOUR_BITS {
                    let both = i32::from(scale as u16) | (i32::from(scale) << 16);
                    add_scaled(total[g], lo, hi, _mm512_set1_epi32(both), true)
                } else {
                    // Both halves take the same scale: one multiply.
                    let scaled = _mm512_mullo_epi32(
                        _mm512_add_epi32(lo, hi),
                        _mm512_set1_epi32(i32::from(scale)),
                    );
                    _mm512_add_epi32(total[g], scaled)
                };
            }
        }
    }
    for g in 0..G {
        let y = ys[g];
        let offsets = weighted_sums(&y.sums, |q| {
            let pair = i32::from(mins[2 * q]) | (i32::from(mins[2 * q + 1]) << 16);
            _mm512_set1_epi32(pair)
        });
        let yd = _mm512_loadu_ps(y.d.as_ptr());
        acc[g] = scale_block(acc[g], total[g], offsets, yd, factors, false);
    }
}

/// Q4_K and Q5_K differ only in how a chunk unpacks (`chunk`).
macro_rules! k_quant_wide_block {
    ($($block:ty: $four_bits:expr),*) => {$(
        impl WideBlock for $block {
            #[inline(always)]
            unsafe fn sixteens<const G: usize>(
                &self,
                ys: [&BlockQ8Kx16; G],
                acc: &mut [__m512; G],
            ) {
                let mut values = Unpacked::of_chunks(|c| self.chunk(c));
                let factors = (f32_of(self.d), f32_of(self.dmin));
                let values = opaque(&mut values);
                k_quant_sixteens::<G, $four_bits>(values, &self.scales, factors, ys, acc)
            }
        }
    )*};
}

k_quant_wide_block!(BlockQ4K: true, BlockQ5K: false);

macro_rules! sixteen_wide_block {
    ($($block:ty),*) => {$(
        impl WideBlock for $block {
            #[inline(always)]
            unsafe fn sixteens<const G: usize>(
                &self,
                ys: [&BlockQ8Kx16; G],
                acc: &mut [__m512; G],
            ) {
                sixteen_sixteens(self, ys, acc)
            }
        }
    )*};
}

sixteen_wide_block!(BlockQ6K, BlockQ3K, BlockQ2K);

/// Q6_K, Q3_K and Q2_K: sub-blocks of 16 values, a chain each.
#[inline(always)]
unsafe fn sixteen_sixteens<B: SixteenBlock, const G: usize>(
    block: &B,
    ys: [&BlockQ8Kx16; G],
    acc: &mut [__m512; G],
) {
    let mut values = Unpacked::of_runs(block);
    let values = opaque(&mut values);
    let (scales, mins) = block.scale_vectors();
    // The scales of sub-blocks 2t and 2t+1 in i32 lane t (as the 256-bit kernels take them).
    let scales = _mm256_cvtepi8_epi16(scales);
    let mut total = [_mm512_setzero_si512(); G];
    for pair in 0..4 {
        let sums = run_pair_sums(values, 2 * pair, ys);
        for (r, half_sums) in sums.iter().enumerate() {
            // Run t's halves are sub-blocks 2t and 2t+1.
            let t = 2 * pair + r;
            let pair = wide_pair(scales, t);
            for g in 0..G {
                let [lo, hi] = [half_sums[0][g], half_sums[1][g]];
                total[g] = add_scaled(total[g], lo, hi, pair, B::SUMS_FIT_I16);
            }
        }
    }
    let factors = block.factors();
    // The offset's weights: the minimums (Q2_K), or the scales times the stored offset.
    let weights = if B::MINIMUMS {
        _mm256_cvtepi8_epi16(mins)
    } else {
        scales
    };
    let offset_bits = _mm_cvtsi32_si128(B::OFFSET_BITS);
    for g in 0..G {
        let y = ys[g];
        let mut offsets = weighted_sums(&y.bsums, |q| wide_pair(weights, q));
        if !B::MINIMUMS {
            // The stored offset times Σ scale·bsum, taken off the values before scaling.
            offsets = _mm512_sll_epi32(offsets, offset_bits);
        }
        let yd = _mm512_loadu_ps(y.d.as_ptr());
        acc[g] = scale_block(acc[g], total[g], offsets, yd, factors, !B::MINIMUMS);
    }
}
