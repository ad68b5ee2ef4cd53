//! x86 matrix products, in builds chosen at run time. K-quant weight rows with Q8_K
//! activation rows: the tiles here (AVX2), the VNNI ones in `vnni.rs`, each block type's
//! unpacking in `k_blocks.rs`, the activations' quantizing and the output's transposing in
//! `activations.rs`. The 32-value types: row by row in `legacy_tiles.rs`, eight activation
//! rows at a time in `legacy_interleaved.rs`. Float weights: `float_tiles.rs`.
//!
//! The weights are read in the file's own block layout (no repacked copy). A prompt's tile
//! of weight rows meets its tile of activation rows one 256-value block column at a time, so
//! that column's activations stay in L1 for all the tile's weight rows; decoding streams go
//! row after row, prefetched.
//!
//! AVX2: each 32 values of a row take one `maddubs` (unsigned weight × signed activation,
//! pairs summed to i16) and one `madd` by the sub-block scale (to i32); four activation
//! rows share each unpacking of a weight block, and their sums are reduced together.

use std::arch::x86_64::*;

use super::blocks::BlockQ8K;
use super::kquant::{TILE_ACTS, TILE_ROWS};

mod activations;
mod float_tiles;
mod k_blocks;
mod legacy_interleaved;
mod legacy_tiles;
mod vnni;
pub use activations::{quantize_q8k, transpose};
pub use float_tiles::{float_group, FloatGroup};
use k_blocks::Unpacked;
pub use legacy_interleaved::{interleaved, InterleavedGroup, InterleavedKernel};
pub use legacy_tiles::{
    legacy_group_avx2, legacy_group_avx512_vnni, legacy_group_avx_vnni, LegacyGroup,
};
pub use vnni::{has_avx512_vnni, has_avx_vnni, tile_avx512_vnni, tile_avx_vnni, VnniBlock};

pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// `out[j * ys.len() + i] = w[j] · ys[i]`, with AVX2.
///
/// Safety: the CPU must have AVX2, FMA and F16C (`has_avx2`); every row of `w` and `ys` has
/// the same number of blocks; at most `TILE_ROWS` × `TILE_ACTS`; `out` is `w.len() * ys.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_avx2<B: Avx2Block>(w: &[&[B]], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    tile::<Avx2, B>(w, ys, out)
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
/// takes a third off the work per activation row (`vnni.rs`). The sums are exact either way.
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

/// The lane sums of four vectors, as four floats.
#[inline(always)]
unsafe fn hsum4(v: [__m256i; 4]) -> __m128 {
    let s = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    _mm_cvtepi32_ps(s)
}

#[inline(always)]
unsafe fn offsets(p: &Prepared, y: &BlockQ8K) -> __m256i {
    _mm256_madd_epi16(load(y.bsums.as_ptr()), p.offset_weights)
}

#[inline(always)]
unsafe fn tile<A: MulAdd, B: Avx2Block>(w: &[&[B]], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    let m = ys.len();
    let blocks = w.first().map_or(0, |row| row.len());
    // What the unchecked indexing below relies on.
    debug_assert!(w.len() <= TILE_ROWS && m <= TILE_ACTS);
    debug_assert!(w.iter().all(|row| row.len() == blocks));
    debug_assert!(ys.iter().all(|y| y.len() >= blocks));
    debug_assert!(out.len() >= w.len() * m);
    if m <= ROW_ORDER_ACTS {
        decode_tile::<A, B>(w, ys, out);
        return;
    }
    let groups = m / 4;
    let rest = m - 4 * groups;
    // One accumulator per weight row and group of four activation rows (its four outputs),
    // and eight partial sums per weight row and leftover activation row.
    let mut acc4 = [_mm_setzero_ps(); TILE_ROWS * TILE_ACTS / 4];
    let mut acc1 = [_mm256_setzero_ps(); TILE_ROWS * 3];
    // A block column's activations stay in L1 for all the tile's weight rows.
    for b in 0..blocks {
        for (j, row) in w.iter().enumerate() {
            let x = row.get_unchecked(b);
            block_products::<A, B>(x, ys, b, &mut acc4[j * groups..], &mut acc1[j * 3..]);
        }
    }
    for j in 0..w.len() {
        let out = &mut out[j * m..(j + 1) * m];
        for g in 0..groups {
            _mm_storeu_ps(out[4 * g..].as_mut_ptr(), acc4[j * groups + g]);
        }
        for k in 0..rest {
            out[4 * groups + k] = hsum(acc1[j * 3 + k]);
        }
    }
}

/// `tile` for decoding, one stream or a few: one weight row after another, each a single
/// stream from memory, prefetched (block columns across rows would be eight streams at
/// once); the few activation rows stay in L1 anyway. Each activation row keeps eight
/// partial sums, reduced once at the row's end rather than once per block (a third of the
/// work per block with four rows), and computed the same way whatever the other rows: a
/// stream's logits do not depend on how many others share its pass.
#[inline(always)]
unsafe fn decode_tile<A: MulAdd, B: Avx2Block>(w: &[&[B]], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    let m = ys.len();
    let groups = m / 4;
    let rest = m - 4 * groups;
    for (j, row) in w.iter().enumerate() {
        let mut acc = [_mm256_setzero_ps(); ROW_ORDER_ACTS];
        for (b, x) in row.iter().enumerate() {
            prefetch(x);
            let p = x.prepare();
            let y = |i: usize| ys.get_unchecked(i).get_unchecked(b);
            for g in 0..groups {
                let rows = [y(4 * g), y(4 * g + 1), y(4 * g + 2), y(4 * g + 3)];
                rows_of::<A, B, 4>(x, &p, rows, acc.as_mut_ptr().add(4 * g));
            }
            leftover_rows::<A, B>(x, &p, y, 4 * groups, rest, acc.as_mut_ptr().add(4 * groups));
        }
        for (i, sums) in acc[..m].iter().enumerate() {
            *out.get_unchecked_mut(j * m + i) = hsum(*sums);
        }
    }
}

/// Weight block `x` (block column `b`) with every activation row: into `acc4` (one per
/// group of four rows) and `acc1` (one per leftover row). A function, not a closure: a
/// closure would not inherit the caller's target features, and its intrinsics would be
/// calls.
#[inline(always)]
unsafe fn block_products<A: MulAdd, B: Avx2Block>(
    x: &B,
    ys: &[&[BlockQ8K]],
    b: usize,
    acc4: &mut [__m128],
    acc1: &mut [__m256],
) {
    let groups = ys.len() / 4;
    let rest = ys.len() - 4 * groups;
    let p = x.prepare();
    let y = |i: usize| ys.get_unchecked(i).get_unchecked(b);
    for g in 0..groups {
        let yg = [y(4 * g), y(4 * g + 1), y(4 * g + 2), y(4 * g + 3)];
        let dots = hsum4(x.dots::<A, 4>(&p, yg));
        let offs = hsum4([
            offsets(&p, yg[0]),
            offsets(&p, yg[1]),
            offsets(&p, yg[2]),
            offsets(&p, yg[3]),
        ]);
        let yd = _mm_set_ps(yg[3].d, yg[2].d, yg[1].d, yg[0].d);
        let a = acc4.get_unchecked_mut(g);
        *a = _mm_fmadd_ps(dots, _mm_mul_ps(yd, _mm_set1_ps(p.d)), *a);
        *a = _mm_fnmadd_ps(offs, _mm_mul_ps(yd, _mm_set1_ps(p.dm)), *a);
    }
    leftover_rows::<A, B>(x, &p, y, 4 * groups, rest, acc1.as_mut_ptr());
}

/// Activation rows up to which a tile goes row by row (`decode_tile`): 8 rows of an
/// 8192-column matrix are 74 KiB of Q8_K blocks, which L2 holds beside the weights.
const ROW_ORDER_ACTS: usize = 8;

/// How far ahead of the weight block in use the decode path asks for the next ones. The
/// hardware prefetchers stop at 4 KiB page boundaries; asking a page ahead keeps a stream
/// of rows flowing. Measured on a 2-core Xeon (260 MiB L3, 15.7 GB/s), Phi-3-mini-shaped
/// Q4_K_M, one stream: 3.3-3.8 tokens/s without, 5.2-5.5 with 2-16 KiB (4 KiB best).
const PREFETCH_AHEAD: usize = 4096;

/// Asks for the cache lines `PREFETCH_AHEAD` bytes past `block` (a hint: an address past
/// the mapping does not fault, and nothing is read through the pointer).
#[inline(always)]
unsafe fn prefetch<B>(block: &B) {
    let at = (block as *const B as *const i8).wrapping_add(PREFETCH_AHEAD);
    for line in 0..std::mem::size_of::<B>().div_ceil(64) {
        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * line));
    }
}

/// `acc[k] += x · y(first + k)` as eight partial sums each, for the `rest` (0..4) activation
/// rows beyond the groups of four: one unpacking of `x` serves all of them.
#[inline(always)]
unsafe fn leftover_rows<'y, A: MulAdd, B: Avx2Block>(
    x: &B,
    p: &Prepared,
    y: impl Fn(usize) -> &'y BlockQ8K,
    first: usize,
    rest: usize,
    acc: *mut __m256,
) {
    match rest {
        1 => rows_of::<A, B, 1>(x, p, [y(first)], acc),
        2 => rows_of::<A, B, 2>(x, p, [y(first), y(first + 1)], acc),
        3 => rows_of::<A, B, 3>(x, p, [y(first), y(first + 1), y(first + 2)], acc),
        _ => {}
    }
}

#[inline(always)]
unsafe fn rows_of<A: MulAdd, B: Avx2Block, const R: usize>(
    x: &B,
    p: &Prepared,
    ys: [&BlockQ8K; R],
    acc: *mut __m256,
) {
    let dots = x.dots::<A, R>(p, ys);
    for (k, y) in ys.into_iter().enumerate() {
        let acc = &mut *acc.add(k);
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[k]), _mm256_set1_ps(p.d * y.d), *acc);
        let offs = _mm256_cvtepi32_ps(offsets(p, y));
        *acc = _mm256_fnmadd_ps(offs, _mm256_set1_ps(p.dm * y.d), *acc);
    }
}
