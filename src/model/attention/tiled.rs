//! Prompt chunks, eight queries at a time: each key and value row read serves eight
//! queries. One query at a time re-reads its head's whole cache per query, and at a
//! 2,000-token context that traffic, not the arithmetic, bounds a chunk. Scores are kept
//! key-major, one lane per query, so the softmax vectorizes across the queries too. The
//! products over the head's dimensions run 8 lanes wide (AVX2) or 16 (AVX-512, `Width`).

use std::arch::x86_64::*;

pub use crate::lanes::{Avx2, Avx512, Lanes};
use crate::model::kv_cache::{Element, HeadRows};

/// Queries per tile: one AVX2 lane each.
pub const TILE: usize = 8;
/// Keys per pass of the weighted sum: their value rows stay in L1 meanwhile.
const BLOCK: usize = 32;

/// Up to `TILE` queries of one head and the keys each sees.
pub struct Tile<'a, E: Element> {
    /// Rows past `count` repeat the first one; their results are discarded.
    pub queries: [&'a [f32]; TILE],
    pub count: usize,
    pub keys: HeadRows<'a, E>,
    pub values: HeadRows<'a, E>,
    /// The cache head the queries read.
    pub kv_h: usize,
    /// Per query, its first and last visible key (an empty range past `count`).
    pub first: [i32; TILE],
    pub last: [i32; TILE],
    pub scale: f32,
}

/// The vectors the products over a head's dimensions take (`Lanes`: AVX2's 8 or AVX-512's
/// 16), and how a cache row loads into them.
pub trait Width: Lanes {
    /// Dimensions `c..c + LANES` of a cache row (`c` a multiple of `LANES`).
    unsafe fn row<E: Element>(row: *const E::Unit, d: usize, c: usize) -> Self::V;
}

impl Width for Avx2 {
    #[inline(always)]
    unsafe fn row<E: Element>(row: *const E::Unit, d: usize, c: usize) -> __m256 {
        E::load8(row, d, c)
    }
}

impl Width for Avx512 {
    #[inline(always)]
    unsafe fn row<E: Element>(row: *const E::Unit, d: usize, c: usize) -> __m512 {
        E::load16(row, d, c)
    }
}

/// Scratch space reused across tiles: scores (TILE per key) and TILE output rows.
#[derive(Default)]
pub struct Scratch {
    scores: Vec<f32>,
    outs: Vec<f32>,
}

/// Writes each query's attention output (normalized) to `out`, `count` rows of head_dim.
///
/// Safety: the CPU must have AVX2, FMA and F16C, and what `W` needs; the head size must be
/// a multiple of `W::LANES`; every query must be that long; each query's key range must be
/// non-empty and lie in the cache.
#[inline(always)]
pub unsafe fn attend<W: Width, E: Element>(
    tile: &Tile<'_, E>,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let d = tile.queries[0].len();
    let live = 0..tile.count;
    let lo = live.clone().map(|r| tile.first[r]).min().unwrap_or(0) as usize;
    let hi = live.clone().map(|r| tile.last[r]).max().unwrap_or(0) as usize;
    let n = hi + 1 - lo;
    debug_assert!(d.is_multiple_of(W::LANES) && out.len() >= tile.count * d);
    debug_assert!(tile.keys.head_dim() == d && tile.values.head_dim() == d);
    scratch.scores.resize(n * TILE, 0.0);
    scratch.outs.clear();
    scratch.outs.resize(TILE * d, 0.0);
    let scores = scratch.scores.as_mut_ptr();

    // Scores, key by key: eight dot products per key row read.
    let q: [*const f32; TILE] = std::array::from_fn(|r| tile.queries[r].as_ptr());
    let scale = _mm256_set1_ps(tile.scale);
    for j in 0..n {
        let k = tile.keys.row(tile.kv_h, lo + j).as_ptr();
        let mut acc = [W::zero(); TILE];
        for c in (0..d).step_by(W::LANES) {
            let kv = W::row::<E>(k, d, c);
            for (acc, q) in acc.iter_mut().zip(q) {
                *acc = W::fmadd(W::load(q.add(c)), kv, *acc);
            }
        }
        let sums = lane_sums(acc.map(|v| W::fold(v)));
        _mm256_storeu_ps(scores.add(j * TILE), _mm256_mul_ps(sums, scale));
    }

    // The softmax numerators, all eight queries at once; keys a query does not see get 0.
    let first = _mm256_loadu_si256(tile.first.as_ptr().cast());
    let last = _mm256_loadu_si256(tile.last.as_ptr().cast());
    let visible = |j: usize| {
        let jv = _mm256_set1_epi32((lo + j) as i32);
        // first <= j <= last
        let after_first = _mm256_cmpgt_epi32(first, jv);
        let past_last = _mm256_cmpgt_epi32(jv, last);
        _mm256_castsi256_ps(_mm256_andnot_si256(
            _mm256_or_si256(after_first, past_last),
            _mm256_set1_epi32(-1),
        ))
    };
    let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
    for j in 0..n {
        let s = _mm256_loadu_ps(scores.add(j * TILE));
        let s = _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), s, visible(j));
        max = _mm256_max_ps(max, s);
    }
    let mut total = _mm256_setzero_ps();
    for j in 0..n {
        let s = _mm256_loadu_ps(scores.add(j * TILE));
        let e = super::simd::exp(_mm256_sub_ps(s, max));
        let e = _mm256_blendv_ps(_mm256_setzero_ps(), e, visible(j));
        _mm256_storeu_ps(scores.add(j * TILE), e);
        total = _mm256_add_ps(total, e);
    }

    // The weighted sum, a block of keys at a time: per slice of `W::LANES` dimensions, the
    // eight outputs stay in registers while the block's values stream from L1.
    let outs = scratch.outs.as_mut_ptr();
    for start in (0..n).step_by(BLOCK) {
        let end = (start + BLOCK).min(n);
        for c in (0..d).step_by(W::LANES) {
            let mut acc: [W::V; TILE] = std::array::from_fn(|r| W::load(outs.add(r * d + c)));
            for j in start..end {
                let v = W::row::<E>(tile.values.row(tile.kv_h, lo + j).as_ptr(), d, c);
                let w = scores.add(j * TILE);
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = W::fmadd(W::splat(w.add(r)), v, *acc);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                W::store(outs.add(r * d + c), *acc);
            }
        }
    }
    let mut totals = [0f32; TILE];
    _mm256_storeu_ps(totals.as_mut_ptr(), total);
    for r in live {
        let norm = 1.0 / totals[r];
        for (o, &x) in out[r * d..(r + 1) * d]
            .iter_mut()
            .zip(&scratch.outs[r * d..(r + 1) * d])
        {
            *o = x * norm;
        }
    }
}

/// The lane sums of eight vectors, as one vector (lane r: the sum of `v[r]`).
#[inline(always)]
unsafe fn lane_sums(v: [__m256; TILE]) -> __m256 {
    let a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    let b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    // a = [s0..s3 of the low halves | s0..s3 of the high halves], b likewise for s4..s7.
    _mm256_add_ps(
        _mm256_permute2f128_ps(a, b, 0x20),
        _mm256_permute2f128_ps(a, b, 0x31),
    )
}
