//! AVX2 + FMA inner loops for one query, for head sizes that are a multiple of 8 (inlined
//! into `head_simd`): four keys per pass, so each query load serves four dot products and
//! each output load and store serves four values. Rows are loaded in the cache's format
//! (`Element::load8`; F16C converts f16), and asked for 16 KiB ahead (`prefetch_rows`): a
//! decoding step after 4,000 tokens of context reads 375 MiB of keys and values (8-layer
//! Phi-3-mini, f16), and without it the 8-layer Q4_K_M file decoded there at 17.4 tokens/s
//! against 22.2 with it (medians of five alternating pairs, 2-vCPU Zen 4; in a faster
//! hour, 8 KiB ahead 22.7, 16 KiB 25.5, 32 KiB 26.1). And the vector exp of every
//! attention path, in 8 lanes (AVX2) and 16 (`exp16`, AVX-512), with the same constants and
//! steps.

use std::arch::x86_64::*;

use super::Query;
use crate::model::kv_cache::{Element, HeadRows};

/// Whether this CPU runs these loops.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Whether this CPU also runs the 16-lane products (`tiled::Avx512`).
pub fn has_avx512() -> bool {
    available() && is_x86_feature_detected!("avx512f")
}

/// `Query::attend`, vectorized.
#[inline(always)]
pub unsafe fn attend<E: Element>(query: &Query<'_, E>, scores: &mut [f32], out: &mut [f32]) -> f32 {
    self::scores(query, scores);
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let total = softmax_numerators(scores, max);
    out.fill(0.0);
    weighted_sum(scores, query.values, query.kv_h, query.range.start, out);
    total
}

/// `scores[n] = scale · query · key(range.start + n)`.
#[inline(always)]
unsafe fn scores<E: Element>(query: &Query<'_, E>, scores: &mut [f32]) {
    let d = query.q.len();
    let q = query.q.as_ptr();
    let (keys, h, first) = (query.keys, query.kv_h, query.range.start);
    let count = query.range.len();
    // What the loads below rely on: whole vectors, keys as long as the query.
    debug_assert!(d.is_multiple_of(8) && scores.len() >= count && keys.head_dim() == d);
    let scale = _mm_set1_ps(query.scale);
    let ahead = rows_ahead::<E>(d);
    let mut n = 0;
    while n + 4 <= count {
        prefetch_rows(keys, h, first + n + ahead, first + count);
        let k: [*const E::Unit; 4] = std::array::from_fn(|r| keys.row(h, first + n + r).as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        for c in (0..d).step_by(8) {
            let qv = _mm256_loadu_ps(q.add(c));
            for r in 0..4 {
                acc[r] = _mm256_fmadd_ps(qv, E::load8(k[r], d, c), acc[r]);
            }
        }
        // Lane sums of the four, as four floats.
        let h = _mm256_hadd_ps(
            _mm256_hadd_ps(acc[0], acc[1]),
            _mm256_hadd_ps(acc[2], acc[3]),
        );
        let sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(scores.as_mut_ptr().add(n), _mm_mul_ps(sums, scale));
        n += 4;
    }
    for (n, score) in scores.iter_mut().enumerate().take(count).skip(n) {
        let k = keys.row(h, first + n).as_ptr();
        let mut acc = _mm256_setzero_ps();
        for c in (0..d).step_by(8) {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c)), E::load8(k, d, c), acc);
        }
        *score = sum(acc) * query.scale;
    }
}

/// The sum of the eight lanes.
#[inline(always)]
unsafe fn sum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// `scores[n] = exp(scores[n] − max)`, returning their sum.
#[inline(always)]
pub unsafe fn softmax_numerators(scores: &mut [f32], max: f32) -> f32 {
    let mut total = _mm256_setzero_ps();
    let mut chunks = scores.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let x = _mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), _mm256_set1_ps(max));
        let e = exp(x);
        _mm256_storeu_ps(chunk.as_mut_ptr(), e);
        total = _mm256_add_ps(total, e);
    }
    let mut rest = 0f32;
    for s in chunks.into_remainder() {
        *s = (*s - max).exp();
        rest += *s;
    }
    sum(total) + rest
}

/// Below this, e^x is under f32's smallest normal; `exp` then gives ~0, as it should.
const EXP_FLOOR: f32 = -87.0;
/// ln 2 = 0.693359375 (exact in a few bits, so n times it is exact) − 2.121944e-4.
const LN2_HIGH: f32 = 0.693_359_4;
const LN2_LOW: f32 = -2.121_944_4e-4;
/// e^r's Taylor coefficients to degree 7, highest first (Horner's order).
const EXP_TAYLOR: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// e^x for x ≤ 0: 2^n · e^r with n = round(x·log2 e) and r = x − n·ln 2 (in two parts,
/// so r keeps its precision), |r| ≤ ½ ln 2, and e^r from its Taylor series to degree 7.
#[inline(always)]
pub unsafe fn exp(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(EXP_FLOOR));
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HIGH), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LOW), r);
    let mut p = _mm256_set1_ps(EXP_TAYLOR[0]);
    for c in &EXP_TAYLOR[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let scale = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), scale))
}

/// `exp` on AVX-512's sixteen lanes: the same steps, so the same results.
///
/// Safety: the CPU has AVX-512F.
#[inline(always)]
pub unsafe fn exp16(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(EXP_FLOOR));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HIGH), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LOW), r);
    let mut p = _mm512_set1_ps(EXP_TAYLOR[0]);
    for c in &EXP_TAYLOR[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let scale = _mm512_slli_epi32::<23>(_mm512_cvtps_epi32(n));
    _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), scale))
}

/// `out += Σ weights[n] · value(first + n)` over head `h`'s values.
#[inline(always)]
unsafe fn weighted_sum<E: Element>(
    weights: &[f32],
    values: HeadRows<'_, E>,
    h: usize,
    first: usize,
    out: &mut [f32],
) {
    let d = out.len();
    let o = out.as_mut_ptr();
    let count = weights.len();
    // What the loads below rely on: whole vectors, values as long as `out`.
    debug_assert!(d.is_multiple_of(8) && values.head_dim() == d);
    let ahead = rows_ahead::<E>(d);
    let mut n = 0;
    while n + 4 <= count {
        prefetch_rows(values, h, first + n + ahead, first + count);
        let v: [*const E::Unit; 4] = std::array::from_fn(|r| values.row(h, first + n + r).as_ptr());
        let p: [__m256; 4] = std::array::from_fn(|r| _mm256_set1_ps(weights[n + r]));
        for c in (0..d).step_by(8) {
            let mut acc = _mm256_loadu_ps(o.add(c));
            for r in 0..4 {
                acc = _mm256_fmadd_ps(p[r], E::load8(v[r], d, c), acc);
            }
            _mm256_storeu_ps(o.add(c), acc);
        }
        n += 4;
    }
    for (n, &weight) in weights.iter().enumerate().skip(n) {
        let v = values.row(h, first + n).as_ptr();
        let p = _mm256_set1_ps(weight);
        for c in (0..d).step_by(8) {
            let acc = _mm256_fmadd_ps(p, E::load8(v, d, c), _mm256_loadu_ps(o.add(c)));
            _mm256_storeu_ps(o.add(c), acc);
        }
    }
}

/// Bytes ahead of the rows being read that the decoding loops ask for, into L2: a head's
/// rows in a page run 48 KiB (Phi-3-mini, f16), and the hardware prefetchers stop at each
/// 4 KiB page of it, as they do in the weights (`quant::x86::STREAM_AHEAD`).
const KV_AHEAD: usize = 16384;

/// Rows of `d` values that make `KV_AHEAD` bytes.
#[inline(always)]
fn rows_ahead<E: Element>(d: usize) -> usize {
    (KV_AHEAD / (E::units(d) * std::mem::size_of::<E::Unit>()).max(1)).max(4)
}

/// Asks for rows `from..from + 4` of head `h` (those before `end`), every cache line.
#[inline(always)]
unsafe fn prefetch_rows<E: Element>(rows: HeadRows<'_, E>, h: usize, from: usize, end: usize) {
    for j in from..(from + 4).min(end) {
        let row = rows.row(h, j);
        let bytes = std::mem::size_of_val(row);
        let start = row.as_ptr().cast::<i8>();
        for at in (0..bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T1>(start.add(at));
        }
    }
}
