//! Prompt chunks, a block of keys at a time (flash-style): the block's keys (transposed) and
//! values are converted to f32 once, into L1, and every tile of the chunk's queries that
//! sees them takes its scores, its softmax update and its weighted sum from there. Going
//! query tile by query tile over the whole cache instead re-reads it (and converts it) per
//! tile; at 4,000 tokens of context that was a third of a prompt's time.
//!
//! A tile is `Q` queries (eight in AVX-512's 32 registers, four in AVX2's 16), a block two
//! vectors of keys: the tile's scores are 2·Q accumulators, a key per lane, so no
//! horizontal sums. Each query's running sums are rescaled by how much its maximum grew
//! (the online softmax), and `S` vectors of each output stay in registers while the
//! block's values stream past. Widths: AVX2's 8 lanes or AVX-512's 16 (`Width`).
//!
//! Measured (64 queries against 4,000 f16 keys, 32 heads, 2 threads, Xeon with AVX-512):
//! 14.7-15.3 ms, against 36.5 ms for eight queries at a time over the whole cache with AVX2
//! (115 ms with AVX-512, whose closures were not inlined); this path's AVX2 build takes
//! 21-24 ms.

use std::arch::x86_64::*;
use std::ops::Range;

pub use crate::lanes::{Avx2, Avx512, Lanes};
use crate::model::kv_cache::{Element, HeadRows};

/// The vectors the products run on (`Lanes`: AVX2's 8 or AVX-512's 16), how a cache row
/// loads into them, and the softmax's operations on a vector of scores (a key per lane).
pub trait Width: Lanes {
    /// Dimensions `c..c + LANES` of a cache row (`c` a multiple of `LANES`).
    unsafe fn row<E: Element>(row: *const E::Unit, d: usize, c: usize) -> Self::V;
    /// e^x for x ≤ 0 (`simd::exp`).
    unsafe fn exp(x: Self::V) -> Self::V;
    /// `v` in the lanes `i` with `base + i` in `seen`, `fill` in the others.
    unsafe fn keep(v: Self::V, base: usize, seen: &Range<usize>, fill: f32) -> Self::V;
    unsafe fn max_lane(v: Self::V) -> f32;
    unsafe fn sum_lanes(v: Self::V) -> f32;
}

impl Width for Avx2 {
    #[inline(always)]
    unsafe fn row<E: Element>(row: *const E::Unit, d: usize, c: usize) -> __m256 {
        E::load8(row, d, c)
    }
    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        super::simd::exp(x)
    }
    #[inline(always)]
    unsafe fn keep(v: __m256, base: usize, seen: &Range<usize>, fill: f32) -> __m256 {
        let index = _mm256_add_epi32(
            _mm256_set1_epi32(base as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        let inside = _mm256_and_si256(
            _mm256_cmpgt_epi32(index, _mm256_set1_epi32(seen.start as i32 - 1)),
            _mm256_cmpgt_epi32(_mm256_set1_epi32(seen.end as i32), index),
        );
        _mm256_blendv_ps(_mm256_set1_ps(fill), v, _mm256_castsi256_ps(inside))
    }
    #[inline(always)]
    unsafe fn max_lane(v: __m256) -> f32 {
        horizontal(v, |a, b| _mm_max_ps(a, b))
    }
    #[inline(always)]
    unsafe fn sum_lanes(v: __m256) -> f32 {
        horizontal(v, |a, b| _mm_add_ps(a, b))
    }
}

impl Width for Avx512 {
    #[inline(always)]
    unsafe fn row<E: Element>(row: *const E::Unit, d: usize, c: usize) -> __m512 {
        E::load16(row, d, c)
    }
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        super::simd::exp16(x)
    }
    #[inline(always)]
    unsafe fn keep(v: __m512, base: usize, seen: &Range<usize>, fill: f32) -> __m512 {
        // Bit i: base + i in seen (both ends clamped to the vector's sixteen lanes).
        let lanes = |k: usize| (1u32 << k.saturating_sub(base).min(16)) - 1;
        let inside = (lanes(seen.end) & !lanes(seen.start)) as __mmask16;
        _mm512_mask_blend_ps(inside, _mm512_set1_ps(fill), v)
    }
    #[inline(always)]
    unsafe fn max_lane(v: __m512) -> f32 {
        _mm512_reduce_max_ps(v)
    }
    #[inline(always)]
    unsafe fn sum_lanes(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
}

/// One head's queries of a prompt chunk and the cache they read.
pub struct Chunk<'a, E: Element> {
    /// `count` rows of head_dim values; row i is the query at position `offset + i`.
    pub queries: &'a [f32],
    pub keys: HeadRows<'a, E>,
    pub values: HeadRows<'a, E>,
    /// The cache head the queries read.
    pub kv_h: usize,
    pub offset: usize,
    pub window: Option<usize>,
    pub scale: f32,
}

impl<E: Element> Chunk<'_, E> {
    /// The first key a query at `pos` sees: all before it, or its window's.
    fn first_key(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }
}

/// Space reused across a chunk's blocks.
#[derive(Default)]
pub struct Scratch {
    /// The block's keys transposed: dimension-major, a key per lane.
    keys: Vec<f32>,
    values: Vec<f32>,
    /// A tile's softmax numerators for the block.
    weights: Vec<f32>,
    /// Per query: the largest score so far, and the sum of the numerators relative to it.
    max: Vec<f32>,
    total: Vec<f32>,
    /// Where a tile's rows past the chunk's end write.
    spare: Vec<f32>,
}

/// Writes each query's attention output (normalized) to `out`, `count` rows of head_dim:
/// tiles of `Q` (at most 8) queries, `S` output vectors per query in registers over a
/// block's values.
///
/// Safety: the CPU must have AVX2, FMA and F16C, and what `W` needs; the head size must be
/// a multiple of `W::LANES`; the cache must hold every query's position.
#[inline(always)]
pub unsafe fn attend<W: Width, E: Element, const Q: usize, const S: usize>(
    chunk: &Chunk<'_, E>,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let d = chunk.keys.head_dim();
    let count = out.len() / d;
    let block = 2 * W::LANES;
    debug_assert!(d.is_multiple_of(W::LANES) && chunk.values.head_dim() == d);
    debug_assert!(chunk.queries.len() >= count * d);
    scratch.keys.resize(d * block, 0.0);
    scratch.values.resize(block * d, 0.0);
    scratch.weights.resize(Q * block, 0.0);
    scratch.spare.resize(d, 0.0);
    scratch.max.clear();
    scratch.max.resize(count, f32::NEG_INFINITY);
    scratch.total.clear();
    scratch.total.resize(count, 0.0);
    out.fill(0.0);

    let end = chunk.offset + count;
    let mut first = chunk.first_key(chunk.offset);
    while first < end {
        let keys = block.min(end - first);
        stage::<W, E>(chunk, first, keys, block, scratch);
        // The queries that see a key of the block: at or after its first key, and (with
        // a window) not past the last query whose window reaches its last key.
        let seen_from = first.saturating_sub(chunk.offset);
        // Saturating: a file may give a window of up to u64::MAX ("none").
        let seen_to = chunk.window.map_or(count, |w| {
            (first + keys - 1)
                .saturating_add(w)
                .saturating_sub(chunk.offset)
                .min(count)
        });
        for t in (seen_from / Q * Q..seen_to).step_by(Q) {
            tile::<W, E, Q, S>(chunk, t, count, first, keys, scratch, out);
        }
        first += keys;
    }
    for (row, total) in out.chunks_exact_mut(d).zip(&scratch.total) {
        let norm = 1.0 / total;
        for o in row {
            *o *= norm;
        }
    }
}

/// The keys `first..first + keys` into `scratch.keys` (transposed, `block` lanes per
/// dimension) and their values into `scratch.values`, as f32.
#[inline(always)]
unsafe fn stage<W: Width, E: Element>(
    chunk: &Chunk<'_, E>,
    first: usize,
    keys: usize,
    block: usize,
    scratch: &mut Scratch,
) {
    let d = chunk.keys.head_dim();
    let values = scratch.values.as_mut_ptr();
    for j in 0..keys {
        let row = chunk.values.row(chunk.kv_h, first + j).as_ptr();
        for c in (0..d).step_by(W::LANES) {
            W::store(values.add(j * d + c), W::row::<E>(row, d, c));
        }
    }
    // Eight keys by eight dimensions at a time. Lanes past `keys` repeat the last key:
    // no query sees them (`keep` masks them), and no branch is needed per row.
    let transposed = scratch.keys.as_mut_ptr();
    for j0 in (0..block).step_by(8) {
        let rows: [*const E::Unit; 8] = std::array::from_fn(|r| {
            let j = (j0 + r).min(keys - 1);
            chunk.keys.row(chunk.kv_h, first + j).as_ptr()
        });
        for c0 in (0..d).step_by(8) {
            let mut m = [_mm256_setzero_ps(); 8];
            for (m, row) in m.iter_mut().zip(rows) {
                *m = E::load8(row, d, c0);
            }
            for (i, column) in transpose(m).into_iter().enumerate() {
                _mm256_storeu_ps(transposed.add((c0 + i) * block + j0), column);
            }
        }
    }
}

/// The tile of queries `t..t + Q` (those before `count`) against the staged block of
/// `keys` keys from `first`: the scores, the softmax update, the weighted sum into `out`.
#[inline(always)]
unsafe fn tile<W: Width, E: Element, const Q: usize, const S: usize>(
    chunk: &Chunk<'_, E>,
    t: usize,
    count: usize,
    first: usize,
    keys: usize,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let d = chunk.keys.head_dim();
    let block = 2 * W::LANES;
    debug_assert!(Q <= 8);
    let rows = (count - t).min(Q);
    let q: [*const f32; Q] =
        std::array::from_fn(|r| chunk.queries.as_ptr().add((t + r.min(rows - 1)) * d));

    // Scores: a key per lane, so each dimension is one multiply-add per query and vector.
    let kt = scratch.keys.as_ptr();
    let mut acc = [[W::zero(); 2]; Q];
    for c in 0..d {
        let k = [
            W::load(kt.add(c * block)),
            W::load(kt.add(c * block + W::LANES)),
        ];
        for (acc, q) in acc.iter_mut().zip(q) {
            let q = W::splat(q.add(c));
            acc[0] = W::fmadd(q, k[0], acc[0]);
            acc[1] = W::fmadd(q, k[1], acc[1]);
        }
    }
    // The softmax update, in registers: per query its new maximum, `rescale` (what its
    // sums so far shrink by: one vector exp for the tile), and the block's numerators.
    let mut seen: [Range<usize>; Q] = std::array::from_fn(|_| 0..0);
    let mut old_max = [0f32; 8];
    let mut new_max = [0f32; 8];
    let scale = W::splat(&chunk.scale);
    for (r, (seen, acc)) in seen.iter_mut().zip(&mut acc).enumerate() {
        let i = t + r;
        let pos = chunk.offset + i;
        if r >= rows || pos < first || chunk.first_key(pos) >= first + keys {
            continue;
        }
        // The block's keys this query sees, as indices into the block.
        *seen = chunk.first_key(pos).saturating_sub(first)..(pos + 1 - first).min(keys);
        for (v, acc) in acc.iter_mut().enumerate() {
            *acc = W::mul(*acc, scale);
            if seen.len() < block {
                *acc = W::keep(*acc, v * W::LANES, seen, f32::NEG_INFINITY);
            }
        }
        old_max[r] = scratch.max[i];
        new_max[r] = W::max_lane(W::max(acc[0], acc[1])).max(old_max[r]);
    }
    let mut rescale = [0f32; 8];
    let shrink = _mm256_sub_ps(
        _mm256_loadu_ps(old_max.as_ptr()),
        _mm256_loadu_ps(new_max.as_ptr()),
    );
    _mm256_storeu_ps(rescale.as_mut_ptr(), super::simd::exp(shrink));
    let weights = scratch.weights.as_mut_ptr();
    for (r, (seen, acc)) in seen.iter().zip(&mut acc).enumerate() {
        if seen.is_empty() {
            *acc = [W::zero(); 2];
        } else {
            let max = W::splat(&new_max[r]);
            for (v, acc) in acc.iter_mut().enumerate() {
                *acc = W::exp(W::sub(*acc, max));
                if seen.len() < block {
                    *acc = W::keep(*acc, v * W::LANES, seen, 0.0);
                }
            }
            let i = t + r;
            let total = W::sum_lanes(W::add(acc[0], acc[1]));
            scratch.total[i] = scratch.total[i] * rescale[r] + total;
            scratch.max[i] = new_max[r];
        }
        W::store(weights.add(r * block), acc[0]);
        W::store(weights.add(r * block + W::LANES), acc[1]);
    }

    // The weighted sum, `S` vectors of the tile's outputs at a time (then two, then one).
    let o: [*mut f32; Q] = std::array::from_fn(|r| match r < rows {
        true => out.as_mut_ptr().add((t + r) * d),
        false => scratch.spare.as_mut_ptr(),
    });
    let values = scratch.values.as_ptr();
    let mut c = 0;
    while c + S * W::LANES <= d {
        weighted_sum::<W, Q, S>(o, c, &rescale, weights, block, values, keys, d);
        c += S * W::LANES;
    }
    while c + 2 * W::LANES <= d {
        weighted_sum::<W, Q, 2>(o, c, &rescale, weights, block, values, keys, d);
        c += 2 * W::LANES;
    }
    while c < d {
        weighted_sum::<W, Q, 1>(o, c, &rescale, weights, block, values, keys, d);
        c += W::LANES;
    }
}

/// `o[r][c..c + S·LANES] = rescale[r] · o[r][..] + Σ_j weights[r][j] · values[j][..]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted_sum<W: Width, const Q: usize, const S: usize>(
    o: [*mut f32; Q],
    c: usize,
    rescale: &[f32; 8],
    weights: *const f32,
    block: usize,
    values: *const f32,
    keys: usize,
    d: usize,
) {
    // Loops, not `array::from_fn`: its closures are not inlined into this function, and
    // neither are the intrinsics they call (measured: a tenth of a long prompt in calls).
    let mut acc = [[W::zero(); S]; Q];
    for (r, acc) in acc.iter_mut().enumerate() {
        let scale = W::splat(&rescale[r]);
        for (s, acc) in acc.iter_mut().enumerate() {
            *acc = W::mul(W::load(o[r].add(c + s * W::LANES)), scale);
        }
    }
    for j in 0..keys {
        let mut w = [W::zero(); Q];
        for (r, w) in w.iter_mut().enumerate() {
            *w = W::splat(weights.add(r * block + j));
        }
        for s in 0..S {
            let v = W::load(values.add(j * d + c + s * W::LANES));
            for (acc, w) in acc.iter_mut().zip(w) {
                acc[s] = W::fmadd(w, v, acc[s]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (s, acc) in acc.iter().enumerate() {
            W::store(o[r].add(c + s * W::LANES), *acc);
        }
    }
}

/// `op` over a vector's eight lanes.
#[inline(always)]
unsafe fn horizontal(v: __m256, op: impl Fn(__m128, __m128) -> __m128) -> f32 {
    let x = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let x = op(x, _mm_movehl_ps(x, x));
    _mm_cvtss_f32(op(x, _mm_movehdup_ps(x)))
}

/// Row i of the result is column i of `m`.
#[inline(always)]
unsafe fn transpose(m: [__m256; 8]) -> [__m256; 8] {
    let t = [
        _mm256_unpacklo_ps(m[0], m[1]),
        _mm256_unpackhi_ps(m[0], m[1]),
        _mm256_unpacklo_ps(m[2], m[3]),
        _mm256_unpackhi_ps(m[2], m[3]),
        _mm256_unpacklo_ps(m[4], m[5]),
        _mm256_unpackhi_ps(m[4], m[5]),
        _mm256_unpacklo_ps(m[6], m[7]),
        _mm256_unpackhi_ps(m[6], m[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x20>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x20>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x20>(u[3], u[7]),
        _mm256_permute2f128_ps::<0x31>(u[0], u[4]),
        _mm256_permute2f128_ps::<0x31>(u[1], u[5]),
        _mm256_permute2f128_ps::<0x31>(u[2], u[6]),
        _mm256_permute2f128_ps::<0x31>(u[3], u[7]),
    ]
}
