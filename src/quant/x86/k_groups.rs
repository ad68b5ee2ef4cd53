//! K-quant products in groups of eight activation rows: the activations are interleaved
//! (`BlockQ8Kx8`) so that one step multiplies four broadcast weights with the same four
//! positions of eight rows, one lane per row; each broadcast serves up to four such groups
//! with 16 registers (AVX2, VEX), eight with EVEX's 32. A sub-block's scale then applies
//! once per eight rows. The step (`GroupDot`, in `group_dot.rs`) is VNNI's `vpdpbusd` in
//! two encodings, one build each: AVX-VNNI (VEX) and AVX-512 VNNI with VL (EVEX, on 256-bit
//! registers; where a CPU has both, EVEX's runs); without VNNI, AVX2's `maddubs` into
//! 16-bit lanes, summed there for as many steps as stay exact. A weight block is unpacked
//! to bytes once per tile row (`Unpacked`), so each broadcast is one load. With AVX-512
//! VNNI, passes of 32 rows or more go sixteen rows to a 512-bit register instead
//! (`wide.rs`).
//!
//! Three or four rows left (decoding as many streams) are a group of four (`BlockQ8Kx4`):
//! one `vpdpbusd` multiplies eight broadcast weights with eight positions of each row (AVX2:
//! one `maddubs` and a 16-bit add), two lanes per row (their integer totals added before the
//! scaling). Against the row-by-row path's `maddubs` + `vpdpwssd` per row and 32 values,
//! that is one instruction per row and 32 values with VNNI, besides the scale's multiply
//! per sub-block.
//!
//! Per pass of an 8192×3072 matrix, 64 rows, AVX2 on the Xeon VM, row by row (four rows
//! per unpacking) -> groups of eight: Q4_K 15.0 -> 9.4 ms, Q5_K 14.4 -> 9.1, Q6_K 14.9 ->
//! 10.3 (3072×8192: 17.0 -> 9.3-10.4); AVX-VNNI's groups take 6.8-7.4 ms.

use std::arch::x86_64::*;

use super::super::blocks::BlockQ8K;
use super::super::blocks::BlockQ8Kx;
use super::super::blocks::BlockQ8Kx16;
use super::super::blocks::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K};
use super::super::kquant::{Groups, TILE_ACTS, TILE_ROWS};
use super::group_dot::{chain_ends, chain_span, scale_pair, Evex, GroupDot, Vex};
use super::wide::{tile_sixteens, WideBlock};
use super::{
    f32_of, load, nibbles, prefetch, prefetch_next_tile, scale_block, tile,
    widened_scales_and_mins, Avx2, Avx2Block, SixteenBlock, Unpacked,
};

/// A K-quant block that can be multiplied with interleaved groups of activation blocks.
pub trait GroupBlock: Avx2Block + WideBlock {
    /// `acc[g]` (its rows' lanes) += this block · group g's block, with `V`'s steps.
    unsafe fn interleaved_dots<V: GroupDot, const RUN: usize, const G: usize>(
        &self,
        ys: [&BlockQ8Kx<RUN>; G],
        acc: &mut [__m256; G],
    );
}

/// `out[j * ys.len() + i] = w[j] · ys[i]`, with AVX2 (`GroupDot for Avx2`) for the rows
/// in `groups` and row by row for the rest.
///
/// Safety: the CPU must have AVX2, FMA and F16C (`has_avx2`); every row of `w` and `ys` has
/// the same number of blocks; at most `TILE_ROWS` × `TILE_ACTS`; `out` is `w.len() *
/// ys.len()`; `groups` interleaves the rows of `ys` it says it does (no sixteens).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_avx2<B: GroupBlock>(
    w: &[&[B]],
    ys: &[&[BlockQ8K]],
    groups: Groups,
    out: &mut [f32],
) {
    tile_groups::<Avx2, B>(w, ys, groups, out)
}

/// As `tile_avx2`, with AVX-VNNI (`has_avx_vnni`).
///
/// Safety: as for `tile_avx2`, on a CPU with `has_avx_vnni`.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn tile_avx_vnni<B: GroupBlock>(
    w: &[&[B]],
    ys: &[&[BlockQ8K]],
    groups: Groups,
    out: &mut [f32],
) {
    tile_groups::<Vex, B>(w, ys, groups, out)
}

/// `tile_avx_vnni` with AVX-512 VNNI's encoding (`has_avx512_vnni`): the same results.
///
/// Safety: as for `tile_avx2`, on a CPU with `has_avx512_vnni` (groups of sixteen too).
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub unsafe fn tile_avx512_vnni<B: GroupBlock>(
    w: &[&[B]],
    ys: &[&[BlockQ8K]],
    groups: Groups,
    out: &mut [f32],
) {
    tile_groups::<Evex, B>(w, ys, groups, out)
}

#[inline(always)]
unsafe fn tile_groups<V: GroupDot, B: GroupBlock>(
    w: &[&[B]],
    ys: &[&[BlockQ8K]],
    groups: Groups,
    out: &mut [f32],
) {
    let m = ys.len();
    let mut covered = 0;
    if !groups.sixteens.is_empty() {
        // Only made for AVX-512 VNNI's kernels (`QMatrix::interleave`), so the CPU has it.
        tile_sixteens(w, groups.sixteens, m, out);
        covered = (BlockQ8Kx16::ROWS * groups.sixteens.len()).min(m);
    }
    if !groups.eights.is_empty() {
        tile_interleaved::<V, B, 4>(w, groups.eights, 0, m, out);
        covered = (8 * groups.eights.len()).min(m);
    }
    if !groups.fours.is_empty() {
        tile_interleaved::<V, B, 8>(w, groups.fours, covered, m, out);
        covered = m;
    }
    if covered < m {
        // The rows beside the groups (all of them when decoding), in place.
        tile::<V, B>(w, &ys[covered..], covered, m, out);
    }
}

/// `out[j * m + first + i]` for the rows of the interleaved groups, as many at once as
/// `GroupDot::GROUPS` allows, so that each broadcast weight serves up to 64 rows.
#[inline(always)]
unsafe fn tile_interleaved<V: GroupDot, B: GroupBlock, const RUN: usize>(
    w: &[&[B]],
    groups: &[&[BlockQ8Kx<RUN>]],
    first: usize,
    m: usize,
    out: &mut [f32],
) {
    const GROUPS: usize = TILE_ACTS / 8;
    let n = groups.len();
    let mut acc = [_mm256_setzero_ps(); TILE_ROWS * GROUPS];
    let blocks = w.first().map_or(0, |row| row.len());
    // What the unchecked indexing below relies on.
    debug_assert!(w.len() <= TILE_ROWS && n <= GROUPS);
    debug_assert!(w.iter().all(|row| row.len() == blocks));
    debug_assert!(groups.iter().all(|g| g.len() >= blocks));
    if n == 1 {
        // One group (a few decoding streams): row by row, as `tile` does.
        for (j, row) in w.iter().enumerate() {
            for (b, x) in row.iter().enumerate() {
                prefetch(x);
                group_products::<V, B, RUN>(x, groups, b, acc.as_mut_ptr().add(j * GROUPS));
            }
        }
    } else {
        for b in 0..blocks {
            for (j, row) in w.iter().enumerate() {
                let acc = acc.as_mut_ptr().add(j * GROUPS);
                let x = row.get_unchecked(b);
                prefetch_next_tile(x, blocks);
                group_products::<V, B, RUN>(x, groups, b, acc);
            }
        }
    }
    let (rows, lanes_per_row) = (BlockQ8Kx::<RUN>::ROWS, BlockQ8Kx::<RUN>::LANES);
    for j in 0..w.len() {
        for g in 0..n {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[j * GROUPS + g]);
            let at = first + rows * g;
            // A row's first lane; a padded group's rows past `m` are dropped.
            let firsts = lanes.iter().step_by(lanes_per_row);
            for (r, &sum) in firsts.enumerate().take(m - at.min(m)) {
                out[j * m + at + r] = sum;
            }
        }
    }
}

/// Weight block `x` (block column `b`) with each interleaved group, into `acc[g]`: as many
/// groups per unpacking as the encoding's registers hold (`GroupDot::GROUPS`). A function, not
/// a closure, so that it inherits the caller's target features.
#[inline(always)]
unsafe fn group_products<V: GroupDot, B: GroupBlock, const RUN: usize>(
    x: &B,
    groups: &[&[BlockQ8Kx<RUN>]],
    b: usize,
    acc: *mut __m256,
) {
    let y = |g: usize| groups.get_unchecked(g).get_unchecked(b);
    let mut first = 0;
    while first < groups.len() {
        let n = (groups.len() - first).min(V::GROUPS);
        let acc = acc.add(first);
        let y = |g: usize| y(first + g);
        macro_rules! dots {
            ($($g:expr),*) => {
                x.interleaved_dots::<V, RUN, _>([$(y($g)),*], &mut *(acc as *mut [__m256; [$($g),*].len()]))
            };
        }
        match n {
            8 => dots!(0, 1, 2, 3, 4, 5, 6, 7),
            7 => dots!(0, 1, 2, 3, 4, 5, 6),
            6 => dots!(0, 1, 2, 3, 4, 5),
            5 => dots!(0, 1, 2, 3, 4),
            4 => dots!(0, 1, 2, 3),
            3 => dots!(0, 1, 2),
            2 => dots!(0, 1),
            _ => dots!(0),
        }
        first += n;
    }
}

/// Q4_K/Q5_K, from the block's unpacked values (sub-block s in `values.0[s]`).
/// A chunk's two sub-blocks go side by side: two chains per group, so that the multiply-adds
/// do not wait on each other. `FOUR_BITS`: the values are below 16 (Q4_K), so where a lane
/// sums 16 products (groups of four, RUN 8) its sum fits an i16, and one `vpdpwssd` applies
/// both sub-blocks' scales (instead of two multiplies and adds).
#[inline(always)]
unsafe fn k_quant_interleaved<
    V: GroupDot,
    W: Broadcasts,
    const RUN: usize,
    const G: usize,
    const FOUR_BITS: bool,
>(
    values: &W,
    packed: &[u8; 12],
    (d, dmin): (f32, f32),
    ys: [&BlockQ8Kx<RUN>; G],
    acc: &mut [__m256; G],
) {
    // The scales of sub-blocks 2c and 2c+1 in i32 lane c, the minimums' in lane 4 + c.
    let pairs = widened_scales_and_mins(packed);
    let span = chain_span::<V>(if FOUR_BITS { 15 } else { 31 });
    let mut total = [_mm256_setzero_si256(); G];
    for c in 0..4 {
        let sub_scales = scale_pair(pairs, c);
        let mut lo = [_mm256_setzero_si256(); G];
        let mut hi = [_mm256_setzero_si256(); G];
        for k in 0..32 / RUN {
            let (wl, wh) = values.pair::<RUN>(c, k);
            for g in 0..G {
                let qs = &ys[g].qs;
                lo[g] = V::step(lo[g], wl, load(qs[64 * c / RUN + k].as_ptr()));
                hi[g] = V::step(hi[g], wh, load(qs[(64 * c + 32) / RUN + k].as_ptr()));
            }
            if chain_ends(k, 32 / RUN, span) {
                if W::HIGH_TIMES_16 {
                    // Exact: each product of the chain is a multiple of 16.
                    for h in &mut hi {
                        *h = _mm256_srai_epi32::<4>(*h);
                    }
                }
                V::add_scaled::<G>(&mut total, &lo, &hi, sub_scales, FOUR_BITS && RUN == 8);
                lo = [_mm256_setzero_si256(); G];
                hi = [_mm256_setzero_si256(); G];
            }
        }
    }
    pair_totals::<RUN, G>(&mut total);
    let (d, dmin) = (_mm256_set1_ps(d), _mm256_set1_ps(dmin));
    for g in 0..G {
        let y = ys[g];
        let offsets = weighted_sums(&y.sums, pairs, 4);
        let yd = _mm256_loadu_ps(y.d.as_ptr());
        acc[g] = scale_block(acc[g], total[g], offsets, yd, d, dmin, false);
    }
}

/// Each lane's Σ weight(s)·sum(s) over the sub-block sums of an interleaved group
/// (`sums[q]` holds sub-blocks 2q and 2q+1 as i16 pairs), exact: the minimums' term, or
/// the stored offsets'. The weights of sub-blocks 2q and 2q+1 are i32 lane `first + q` of
/// `weights` (as `scale_pair` takes them).
#[inline(always)]
unsafe fn weighted_sums(sums: &[[i16; 16]], weights: __m256i, first: usize) -> __m256i {
    let mut total = _mm256_setzero_si256();
    for (q, pairs) in sums.iter().enumerate() {
        let pair = scale_pair(weights, first + q);
        total = _mm256_add_epi32(total, _mm256_madd_epi16(load(pairs.as_ptr()), pair));
    }
    total
}

/// Where a row has two lanes (RUN 8), both get the row's exact total, so that the one
/// scaling that follows (and the minimums' term, in the row's first lane) is a single row's
/// as in the other kernels: the same bits.
#[inline(always)]
unsafe fn pair_totals<const RUN: usize, const G: usize>(total: &mut [__m256i; G]) {
    if RUN == 8 {
        for t in total.iter_mut() {
            *t = _mm256_add_epi32(*t, _mm256_shuffle_epi32::<0b10_11_00_01>(*t));
        }
    }
}

/// RUN (4 or 8) bytes at `ptr` repeated across the vector: one row's lanes each.
#[inline(always)]
pub(super) unsafe fn broadcast<const RUN: usize>(ptr: *const u8) -> __m256i {
    if RUN == 8 {
        _mm256_set1_epi64x(std::ptr::read_unaligned(ptr as *const i64))
    } else {
        _mm256_set1_epi32(std::ptr::read_unaligned(ptr as *const i32))
    }
}

/// Where the broadcast weights of a Q4_K or Q5_K block come from.
trait Broadcasts {
    /// Values `RUN·k..RUN·(k + 1)` of sub-blocks 2c and 2c+1, each repeated across a vector.
    unsafe fn pair<const RUN: usize>(&self, c: usize, k: usize) -> (__m256i, __m256i);
    /// Whether the second sub-block's values come 16 times too large (`PackedNibbles`).
    const HIGH_TIMES_16: bool = false;
}

/// The block unpacked once into a buffer (`chunk`), each RUN values then one broadcast: no
/// unpacking per broadcast, and fewer registers held for it, which the 16 of AVX-VNNI's
/// encoding need where a broadcast serves several groups.
impl Broadcasts for Unpacked {
    #[inline(always)]
    unsafe fn pair<const RUN: usize>(&self, c: usize, k: usize) -> (__m256i, __m256i) {
        (
            broadcast::<RUN>(self.0[2 * c].as_ptr().add(RUN * k)),
            broadcast::<RUN>(self.0[2 * c + 1].as_ptr().add(RUN * k)),
        )
    }
}

/// Q4_K's packed bytes (`qs`), broadcast from the weights as they are, then masked: the low
/// nibbles are the first sub-block's values, the high ones (left in place, so 16 times each
/// value) the second's, the chain's total shifted down once at its end. For VNNI's 32-bit
/// chains (with AVX-VNNI's 16 registers, one or two groups only, so that the two masks fit
/// beside them). Out of the unpacked buffer each broadcast is a lane-crossing shuffle,
/// which on Zen 4 shares the two ports `vpdpbusd` runs on (a `vpdpbusd` and a `vpermq` take
/// a cycle together, two `vpdpbusd` half of one), while this is a load and two masks per
/// pair. Per pass of a 4096×3072 matrix, one thread, AVX-512 VNNI on a Zen 4: 4 rows
/// 0.661-0.670 -> 0.643-0.650 ms, 6 (a padded group of eight) 1.20 -> 1.08, 16 2.03-2.05 ->
/// 1.81-1.82, 24 2.61-2.65 -> 2.45-2.47, 31 3.19-3.29 -> 2.89-2.90. (With the high nibbles
/// also shifted down per broadcast, it measured no faster than the shuffles.)
struct PackedNibbles<'a>(&'a [u8; 128]);

impl Broadcasts for PackedNibbles<'_> {
    #[inline(always)]
    unsafe fn pair<const RUN: usize>(&self, c: usize, k: usize) -> (__m256i, __m256i) {
        nibbles(
            broadcast::<RUN>(self.0.as_ptr().add(32 * c + RUN * k)),
            true,
        )
    }
    const HIGH_TIMES_16: bool = true;
}

/// Q4_K and Q5_K differ only in how a chunk unpacks (`chunk`); Q4_K with VNNI takes its
/// packed bytes (`PackedNibbles`).
macro_rules! k_quant_vnni_block {
    ($($block:ty: $four_bits:expr),*) => {$(
        impl GroupBlock for $block {
            #[inline(always)]
            unsafe fn interleaved_dots<V: GroupDot, const RUN: usize, const G: usize>(
                &self,
                ys: [&BlockQ8Kx<RUN>; G],
                acc: &mut [__m256; G],
            ) {
                let factors = (f32_of(self.d), f32_of(self.dmin));
                if $four_bits && V::CHAIN_MAX == i32::MAX && (G <= 2 || V::GROUPS >= 8) {
                    k_quant_interleaved::<V, _, RUN, G, $four_bits>(
                        &PackedNibbles(&self.qs),
                        &self.scales,
                        factors,
                        ys,
                        acc,
                    )
                } else {
                    k_quant_interleaved::<V, _, RUN, G, $four_bits>(
                        &Unpacked::of_chunks(|c| self.chunk(c)),
                        &self.scales,
                        factors,
                        ys,
                        acc,
                    )
                }
            }
        }
    )*};
}

k_quant_vnni_block!(BlockQ4K: true, BlockQ5K: false);

/// Q6_K, Q3_K and Q2_K: sub-blocks of 16.
macro_rules! sixteen_vnni_block {
    ($($block:ty),*) => {$(
        impl GroupBlock for $block {
            #[inline(always)]
            unsafe fn interleaved_dots<V: GroupDot, const RUN: usize, const G: usize>(
                &self,
                ys: [&BlockQ8Kx<RUN>; G],
                acc: &mut [__m256; G],
            ) {
                sixteen_interleaved::<V, _, RUN, G>(self, ys, acc)
            }
        }
    )*};
}

sixteen_vnni_block!(BlockQ6K, BlockQ3K, BlockQ2K);

#[inline(always)]
unsafe fn sixteen_interleaved<V: GroupDot, B: SixteenBlock, const RUN: usize, const G: usize>(
    block: &B,
    ys: [&BlockQ8Kx<RUN>; G],
    acc: &mut [__m256; G],
) {
    // Unpacked once per block, in value order, into a buffer; each four weights are then
    // one broadcast load. Sub-blocks are 16 values: four dwords per scale.
    let values = Unpacked::of_runs(block);
    let (scales, mins) = block.scale_vectors();
    // The scales of sub-blocks 2t and 2t+1 in i32 lane t (signed: Q6_K's and Q3_K's are),
    // taken by a shuffle each: read out of memory byte by byte, as before, they waited on
    // the vector's store (a group of eight Q6_K rows, one thread: 1.71 -> 1.47 ms a pass).
    let scales = _mm256_cvtepi8_epi16(scales);
    let span = chain_span::<V>(B::MAX_VALUE);
    let mut total = [_mm256_setzero_si256(); G];
    for t in 0..8 {
        let sub_scales = scale_pair(scales, t);
        let mut lo = [_mm256_setzero_si256(); G];
        let mut hi = [_mm256_setzero_si256(); G];
        for k in 0..16 / RUN {
            let wl = broadcast::<RUN>(values.0[t].as_ptr().add(RUN * k));
            let wh = broadcast::<RUN>(values.0[t].as_ptr().add(16 + RUN * k));
            for g in 0..G {
                let qs = &ys[g].qs;
                lo[g] = V::step(lo[g], wl, load(qs[32 * t / RUN + k].as_ptr()));
                hi[g] = V::step(hi[g], wh, load(qs[(32 * t + 16) / RUN + k].as_ptr()));
            }
            if chain_ends(k, 16 / RUN, span) {
                V::add_scaled::<G>(&mut total, &lo, &hi, sub_scales, B::SUMS_FIT_I16);
                lo = [_mm256_setzero_si256(); G];
                hi = [_mm256_setzero_si256(); G];
            }
        }
    }
    pair_totals::<RUN, G>(&mut total);
    let (d, dmin) = block.factors();
    // The offset's weights: the minimums (Q2_K), or the scales times the stored offset.
    let weights = if B::MINIMUMS {
        _mm256_cvtepi8_epi16(mins)
    } else {
        scales
    };
    let offset_bits = _mm_cvtsi32_si128(B::OFFSET_BITS);
    let (d, dmin) = (_mm256_set1_ps(d), _mm256_set1_ps(dmin));
    for g in 0..G {
        let y = ys[g];
        let mut offsets = weighted_sums(&y.bsums, weights, 0);
        if !B::MINIMUMS {
            // The stored offset times Σ scale·bsum, taken off the values before scaling.
            offsets = _mm256_sll_epi32(offsets, offset_bits);
        }
        let yd = _mm256_loadu_ps(y.d.as_ptr());
        acc[g] = scale_block(acc[g], total[g], offsets, yd, d, dmin, !B::MINIMUMS);
    }
}
