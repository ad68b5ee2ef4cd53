//! x86 matrix products, in builds chosen at run time. K-quant weight rows with Q8_K activation
//! rows: the row-by-row tiles here (decoding, and rows beside the groups), the groups of eight
//! interleaved rows in `k_groups.rs` (256-bit: AVX2 or VNNI, their steps in `group_dot.rs`) and of
//! sixteen in `wide.rs` (AVX-512's 512-bit registers, for prompts), each block type's unpacking in
//! `k_blocks.rs`, the activations' quantizing and the output's transposing in `activations.rs`. The
//! 32-value types: pairs of weight rows (eight, decoding the 4-bit types) in `legacy_tiles.rs`,
//! eight activation rows at a time in `legacy_interleaved.rs`. Float weights: `float_tiles.rs`.
//!
//! The weights are read in the file's own block layout here, or repacked eight rows to a block
//! (`repacked.rs`, which takes Q4_K, Q5_K, Q6_K and Q4_0 where they are repacked). A prompt's
//! tile of weight rows meets its tile of activation rows one 256-value block column at a time,
//! so that column's activations stay in L1 for all the tile's weight rows; decoding streams go
//! row after row, prefetched.
//!
//! Row by row, with AVX2: each 32 values of a row take one `maddubs` (unsigned weight ×
//! signed activation, pairs summed to i16) and one `madd` by the sub-block scale (to i32);
//! four activation rows share each unpacking of a weight block, and their exact totals are
//! reduced and scaled together.

use std::arch::x86_64::*;

use super::blocks::BlockQ8K;
use super::kquant::{TILE_ACTS, TILE_ROWS};

mod activations;
mod float_tiles;
mod group_dot;
mod k_blocks;
mod k_groups;
mod legacy_interleaved;
mod legacy_tiles;
mod repacked;
mod wide;
pub use activations::{quantize_q8_0, quantize_q8k, transpose};
pub use float_tiles::{float_group, FloatGroup};
pub use group_dot::{has_avx512_vnni, has_avx_vnni};
use k_blocks::{bits_at_4, nibbles, widened_scales_and_mins, SixteenBlock, Unpacked};
pub use k_groups::{tile_avx2, tile_avx512_vnni, tile_avx_vnni, GroupBlock};
pub use legacy_interleaved::{interleaved, InterleavedGroup, InterleavedKernel};
pub use legacy_tiles::{
    legacy_group_avx2, legacy_group_avx512_vnni, legacy_group_avx_vnni, LegacyGroup,
};
pub use repacked::{
    repacked_avx2, repacked_avx512_vnni, repacked_avx_vnni, repacked_q4_0_avx2,
    repacked_q4_0_avx512_vnni, repacked_q4_0_avx_vnni, Q8_0Row, RepackedKernel,
};

pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// What a weight block contributes besides its values: Σ_r = yd·(d·dots − dm·offsets),
/// where `offsets` = Σ over the activation's 16-value sums (`bsums`) of `offset_weights`.
pub struct Prepared {
    scales: __m256i,
    offset_weights: __m256i,
    d: f32,
    dm: f32,
}

/// A K-quant block that can be multiplied with Q8_K activation blocks.
pub trait Avx2Block {
    /// Whether the offsets' factor is `d` (Q6_K's stored +32), so that they come off the
    /// values in integers before the one scaling, as the VNNI kernels take them off.
    const OFFSETS_SCALED_BY_D: bool = false;
    unsafe fn prepare(&self) -> Prepared;
    /// Σ scale·q·y over the block for each activation block, as 8 i32 partial sums.
    unsafe fn dots<A: MulAdd, const R: usize>(
        &self,
        p: &Prepared,
        ys: [&BlockQ8K; R],
    ) -> [__m256i; R];
}

/// `acc + Σ a·b` over each i32 lane's two i16 pairs: where each 32 values' products take
/// their scale. AVX2 takes two instructions (`madd`, `add`); VNNI's `vpdpwssd` one, which
/// takes a third off the work per activation row (`k_groups.rs`). The sums are exact either way.
pub trait MulAdd {
    unsafe fn mul_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;
}

/// AVX2's `madd` and `add`.
pub struct Avx2;

impl MulAdd for Avx2 {
    #[inline(always)]
    unsafe fn mul_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
    }
}

#[inline(always)]
unsafe fn load<T>(ptr: *const T) -> __m256i {
    _mm256_loadu_si256(ptr as *const __m256i)
}

/// An f16 as f32, in one instruction (the `half` crate's conversion is a call).
#[inline(always)]
unsafe fn f32_of(h: half::f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits()))))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Lane k: the sum of `v[k]`'s eight lanes, exact.
#[inline(always)]
unsafe fn lane_totals(v: [__m256i; 8]) -> __m256i {
    // Lane k of each half: v[k]'s sum over that half (k < 4 in the first, k ≥ 4 the second).
    let low = quad_sums(pair_sums(v[0], v[1]), pair_sums(v[2], v[3]));
    let high = quad_sums(pair_sums(v[4], v[5]), pair_sums(v[6], v[7]));
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(low, high),
        _mm256_permute2x128_si256::<0x31>(low, high),
    )
}

/// The lane sums of four vectors, exact.
#[inline(always)]
unsafe fn hsum4(v: [__m256i; 4]) -> __m128i {
    let s = quad_sums(pair_sums(v[0], v[1]), pair_sums(v[2], v[3]));
    _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1))
}

/// Per 128-bit half, lanes (a0+a2, b0+b2, a1+a3, b1+b3): the first step of `hadd`'s
/// reduction in two unpacks and an add. Zen 4 runs `vphaddd` far slower than that: eight
/// decoding Q4_0 rows' totals by `hadd`, one thread, 17.5 GB/s of weights from L2, by
/// unpacks 20.7-21.1 (a pass of a 24576×3072 matrix from memory: 15.2-17.3 -> 17.5-20.9).
#[inline(always)]
unsafe fn pair_sums(a: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b))
}

/// Per 128-bit half, of two `pair_sums` outputs: lanes (Σa, Σb, Σc, Σd) of the four rows
/// they hold.
#[inline(always)]
unsafe fn quad_sums(ab: __m256i, cd: __m256i) -> __m256i {
    _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd))
}

#[inline(always)]
unsafe fn offsets(p: &Prepared, y: &BlockQ8K) -> __m256i {
    _mm256_madd_epi16(load(y.bsums.as_ptr()), p.offset_weights)
}

/// Every row of a tile takes the same steps per block, whatever the rows beside it: its
/// exact integer total, then one fused scaling into its sum (and the minimums' term), as the
/// VNNI groups' lanes do; so a stream's logits are the same bits alone or in any batch.
///
/// Weight row j with activation row i goes to `out[j * stride + first + i]`: the rows
/// beside a tile's groups land in place (`k_groups::tile_groups`), with no scratch tile.
#[inline(always)]
unsafe fn tile<A: MulAdd, B: Avx2Block>(
    w: &[&[B]],
    ys: &[&[BlockQ8K]],
    first: usize,
    stride: usize,
    out: &mut [f32],
) {
    let m = ys.len();
    let groups = m.div_ceil(4);
    // One accumulator per weight row and group of (up to) four activation rows.
    let mut acc = [_mm_setzero_ps(); TILE_ROWS * TILE_ACTS / 4];
    let blocks = w.first().map_or(0, |row| row.len());
    // What the unchecked indexing below relies on.
    debug_assert!(w.len() <= TILE_ROWS && m <= TILE_ACTS);
    debug_assert!(w.iter().all(|row| row.len() == blocks));
    debug_assert!(ys.iter().all(|y| y.len() >= blocks));
    debug_assert!(w.is_empty() || out.len() >= (w.len() - 1) * stride + first + m);
    debug_assert!(first + m <= stride);
    if w.len() == TILE_ROWS {
        match m {
            1 => return eight_rows::<A, B, 1>(w, ys, first, stride, out),
            2 => return eight_rows::<A, B, 2>(w, ys, first, stride, out),
            3 => return eight_rows::<A, B, 3>(w, ys, first, stride, out),
            4 => return eight_rows::<A, B, 4>(w, ys, first, stride, out),
            _ => {}
        }
    }
    if m <= ROW_ORDER_ACTS {
        // Decoding, one stream or a few: one weight row after another, each a single
        // stream from memory, prefetched (block columns across rows would be eight streams
        // at once); the few activation rows stay in L1 anyway.
        for (j, row) in w.iter().enumerate() {
            for (b, x) in row.iter().enumerate() {
                prefetch(x);
                block_products::<A, B>(x, ys, b, &mut acc[j * groups..]);
            }
        }
    } else {
        // A block column's activations stay in L1 for all the tile's weight rows.
        for b in 0..blocks {
            for (j, row) in w.iter().enumerate() {
                let x = row.get_unchecked(b);
                prefetch_next_tile(x, blocks);
                block_products::<A, B>(x, ys, b, &mut acc[j * groups..]);
            }
        }
    }
    for j in 0..w.len() {
        for g in 0..groups {
            let mut sums = [0f32; 4];
            _mm_storeu_ps(sums.as_mut_ptr(), acc[j * groups + g]);
            let rows = (m - 4 * g).min(4);
            out[j * stride + first + 4 * g..][..rows].copy_from_slice(&sums[..rows]);
        }
    }
}

/// Decoding one to four streams: eight weight rows at a time, so that their block totals
/// come out of one reduction (`lane_totals`) into the lanes of one vector and are scaled
/// there together. Per pass of an 8192×3072 matrix on a Xeon, one stream, against row by
/// row: Q4_K 580-635 -> 418-480 µs, Q5_K 620-716 -> 540-613, Q6_K 580-650 -> 512-578,
/// Q3_K 735-843 -> 523-598, Q2_K 880-920 -> 423-460 (AVX2 and VNNI builds alike). Each
/// lane takes a row's steps in `group_products` (its exact integer totals, then the same
/// float operations in the same order): the same bits as the row alone.
#[inline(always)]
unsafe fn eight_rows<A: MulAdd, B: Avx2Block, const R: usize>(
    w: &[&[B]],
    ys: &[&[BlockQ8K]],
    first: usize,
    stride: usize,
    out: &mut [f32],
) {
    let blocks = w[0].len();
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let yb: [&BlockQ8K; R] = std::array::from_fn(|i| ys.get_unchecked(i).get_unchecked(b));
        let mut dots = [[_mm256_setzero_si256(); TILE_ROWS]; R];
        let mut offs = [[_mm256_setzero_si256(); TILE_ROWS]; R];
        let mut d = [0f32; TILE_ROWS];
        let mut dm = [0f32; TILE_ROWS];
        for j in 0..TILE_ROWS {
            let x = w.get_unchecked(j).get_unchecked(b);
            prefetch_decoding(x, blocks);
            let p = x.prepare();
            let products = x.dots::<A, R>(&p, yb);
            for i in 0..R {
                dots[i][j] = products[i];
                offs[i][j] = offsets(&p, yb[i]);
            }
            (d[j], dm[j]) = (p.d, p.dm);
        }
        let (d, dm) = (_mm256_loadu_ps(d.as_ptr()), _mm256_loadu_ps(dm.as_ptr()));
        for i in 0..R {
            let (dots, offs) = (lane_totals(dots[i]), lane_totals(offs[i]));
            let yd = _mm256_set1_ps(yb[i].d);
            acc[i] = scale_block(acc[i], dots, offs, yd, d, dm, B::OFFSETS_SCALED_BY_D);
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let mut sums = [0f32; TILE_ROWS];
        _mm256_storeu_ps(sums.as_mut_ptr(), *acc);
        for (j, &sum) in sums.iter().enumerate() {
            out[j * stride + first + i] = sum;
        }
    }
}

/// `acc` + a block's exact totals, scaled per lane as every kernel scales a row's: with
/// `offsets_by_d` (stored offsets) `yd·d·(dots − offsets)`, else `yd·d·dots − yd·dm·offsets`
/// (minimums), each product fused into the sum; so the lanes of any kernel are the same bits.
#[inline(always)]
unsafe fn scale_block(
    acc: __m256,
    dots: __m256i,
    offsets: __m256i,
    yd: __m256,
    d: __m256,
    dm: __m256,
    offsets_by_d: bool,
) -> __m256 {
    if offsets_by_d {
        let values = _mm256_cvtepi32_ps(_mm256_sub_epi32(dots, offsets));
        _mm256_fmadd_ps(values, _mm256_mul_ps(yd, d), acc)
    } else {
        let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_mul_ps(yd, d), acc);
        _mm256_fnmadd_ps(_mm256_cvtepi32_ps(offsets), _mm256_mul_ps(yd, dm), acc)
    }
}

/// Weight block `x` (block column `b`) with every activation row, into `acc` (one per group
/// of four rows, the last maybe fewer). A function, not a closure: a closure would not
/// inherit the caller's target features, and its intrinsics would be calls.
#[inline(always)]
unsafe fn block_products<A: MulAdd, B: Avx2Block>(
    x: &B,
    ys: &[&[BlockQ8K]],
    b: usize,
    acc: &mut [__m128],
) {
    let full = ys.len() / 4;
    let p = x.prepare();
    let y = |i: usize| ys.get_unchecked(i).get_unchecked(b);
    let acc = acc.as_mut_ptr();
    for g in 0..full {
        let rows = [y(4 * g), y(4 * g + 1), y(4 * g + 2), y(4 * g + 3)];
        group_products::<A, B, 4>(x, &p, rows, &mut *acc.add(g));
    }
    let (first, acc) = (4 * full, &mut *acc.add(full));
    match ys.len() % 4 {
        1 => group_products::<A, B, 1>(x, &p, [y(first)], acc),
        2 => group_products::<A, B, 2>(x, &p, [y(first), y(first + 1)], acc),
        3 => group_products::<A, B, 3>(x, &p, [y(first), y(first + 1), y(first + 2)], acc),
        _ => {}
    }
}

/// `acc` (lane k: row k) += weight block `x` · `ys[k]`: one unpacking of `x` serves the R
/// rows; their exact totals are scaled together.
#[inline(always)]
unsafe fn group_products<A: MulAdd, B: Avx2Block, const R: usize>(
    x: &B,
    p: &Prepared,
    ys: [&BlockQ8K; R],
    acc: &mut __m128,
) {
    let products = x.dots::<A, R>(p, ys);
    let mut yd = [0f32; 4];
    for k in 0..R {
        yd[k] = ys[k].d;
    }
    let yd = _mm_loadu_ps(yd.as_ptr());
    let (dots, offs) = if R <= 2 {
        // One reduction for both rows' dots and offsets (decoding one or two streams).
        let mut v = [_mm256_setzero_si256(); 4];
        for k in 0..R {
            v[2 * k] = products[k];
            v[2 * k + 1] = offsets(p, ys[k]);
        }
        let sums = hsum4(v); // dots 0, offsets 0, dots 1, offsets 1
        (
            _mm_shuffle_epi32::<0b11_11_10_00>(sums),
            _mm_shuffle_epi32::<0b11_11_11_01>(sums),
        )
    } else {
        let mut dots = [_mm256_setzero_si256(); 4];
        let mut offs = [_mm256_setzero_si256(); 4];
        for k in 0..R {
            dots[k] = products[k];
            offs[k] = offsets(p, ys[k]);
        }
        (hsum4(dots), hsum4(offs))
    };
    if B::OFFSETS_SCALED_BY_D {
        let values = _mm_cvtepi32_ps(_mm_sub_epi32(dots, offs));
        *acc = _mm_fmadd_ps(values, _mm_mul_ps(yd, _mm_set1_ps(p.d)), *acc);
    } else {
        let scale = _mm_mul_ps(yd, _mm_set1_ps(p.d));
        *acc = _mm_fmadd_ps(_mm_cvtepi32_ps(dots), scale, *acc);
        let scale = _mm_mul_ps(yd, _mm_set1_ps(p.dm));
        *acc = _mm_fnmadd_ps(_mm_cvtepi32_ps(offs), scale, *acc);
    }
}

/// Activation rows up to which a tile goes row by row (`decode_tile`): 8 rows of an
/// 8192-column matrix are 74 KiB of Q8_K blocks, which L2 holds beside the weights.
const ROW_ORDER_ACTS: usize = 8;

/// How far ahead of the weight block in use the decode path asks for the next ones. The
/// hardware prefetchers stop at 4 KiB page boundaries; asking a page ahead keeps a stream
/// of rows flowing. Measured on a 2-core Xeon (260 MiB L3, 15.7 GB/s), Phi-3-mini-shaped
/// Q4_K_M, one stream: 3.3-3.8 tokens/s without, 5.2-5.5 with 2-16 KiB (4 KiB best).
const PREFETCH_AHEAD: usize = 4096;

/// How far ahead the 32-value types' and the float types' decoding rows ask for their weights,
/// into L2 (`prefetcht1`): two to eight rows stream side by side there, so a page ahead into
/// L1 arrived too late and crowded L1. On a 2-vCPU Zen 4, one stream of the 8-layer files:
/// Q4_0 26 -> 40-44 tokens/s, Q8_0 23 -> 26-36, F16 12.2 -> 15-18.5 (8 KiB ahead: 32.5,
/// 26.5, 15.5; 32 KiB: as 16).
pub(super) const STREAM_AHEAD: usize = 16384;

/// Asks for the cache lines `PREFETCH_AHEAD` bytes past `block` (a hint: an address past
/// the mapping does not fault, and nothing is read through the pointer).
#[inline(always)]
unsafe fn prefetch<B>(block: &B) {
    prefetch_lines::<B, _MM_HINT_T0>((block as *const B as *const i8).wrapping_add(PREFETCH_AHEAD));
}

/// Asks for the same block of the next tile's row (`blocks` a row, rows contiguous): a
/// prompt's tile reads its weights from memory once, block column by block column across
/// its rows, and computes long enough on them for the next tile's to arrive. A page ahead
/// would mostly land in the tile's own rows (a 3,072-column Q4_K row is 1.7 KiB).
///
/// Into L2, not L1: a tile is 14-54 KiB of weights ahead (3,072 to 8,192 columns), as much
/// as L1 holds (32 KiB on Zen, 48 on recent Intel), so lines fetched into L1 that far ahead
/// evict the tile in use and its activations. On a 2-vCPU Zen 4 (EPYC), one decoding
/// stream of the 8-layer Q4_K_M file, one thread: 19.0-19.4 -> 21.0-22.5 tokens/s.
#[inline(always)]
unsafe fn prefetch_next_tile<B>(block: &B, blocks: usize) {
    let at = (block as *const B).wrapping_add(TILE_ROWS * blocks) as *const i8;
    prefetch_lines::<B, _MM_HINT_T1>(at);
}

/// As `prefetch_next_tile`, and the same block three tiles ahead too, for the decoding rows
/// (`eight_rows`): they compute too little per byte to hide memory's latency with one tile
/// in flight (without any prefetch, one stream of the 8-layer Q4_K_M file decodes at 17-25
/// tokens/s against 24-40). Zen 4, one stream, alternating with `llama-bench` tg128 in two
/// spells (medians of 6 and 8): 32.9 -> 37.6 and 38.3 -> 39.3 tokens/s (llama.cpp 39.4 and
/// 41.0); two tiles ahead alone: 36.8 and 38.1.
#[inline(always)]
unsafe fn prefetch_decoding<B>(block: &B, blocks: usize) {
    prefetch_next_tile(block, blocks);
    let far = (block as *const B).wrapping_add(3 * TILE_ROWS * blocks) as *const i8;
    prefetch_lines::<B, _MM_HINT_T1>(far);
}

/// The lines of a `B` at `at`, into the cache level `HINT` names.
#[inline(always)]
unsafe fn prefetch_lines<B, const HINT: i32>(at: *const i8) {
    for line in 0..std::mem::size_of::<B>().div_ceil(64) {
        _mm_prefetch::<HINT>(at.wrapping_add(64 * line));
    }
}
