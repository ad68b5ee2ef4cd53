//! The vector paths against the portable one, for every cache format, and the compact
//! formats against f32.

use candle_core::{Device, Tensor};

use super::{simd, Query};
use crate::model::kv_cache::{Element, HeadRows, KvCache, KvCacheType, Rows};

fn noise(seed: u32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000)
        .map(|v| v as f32 / 500.0 - 2.0)
        .collect()
}

fn tensor(data: &[f32], heads: usize, n: usize, d: usize) -> Tensor {
    Tensor::from_vec(data.to_vec(), (1, heads, n, d), &Device::Cpu).unwrap()
}

/// A cache of `kind` holding `keys` and `values`, (kv_heads, n, d) each.
fn cache(kind: KvCacheType, kv_heads: usize, d: usize, keys: &[f32], values: &[f32]) -> KvCache {
    let n = keys.len() / (kv_heads * d);
    let mut cache = KvCache::new(kind, kv_heads, d, n);
    cache
        .append(
            &tensor(keys, kv_heads, n, d),
            &tensor(values, kv_heads, n, d),
        )
        .unwrap();
    cache
}

/// Which loop runs one query: `Query::attend`, or the AVX2 one (`simd::attend`).
#[derive(Clone, Copy)]
enum Path {
    Portable,
    Vector,
}

/// One query of head `kv_h` over the keys `range`, by `path`: its normalized output.
fn one_query<E: Element>(
    (keys, values): (HeadRows<'_, E>, HeadRows<'_, E>),
    q: &[f32],
    kv_h: usize,
    range: std::ops::Range<usize>,
    scale: f32,
    path: Path,
) -> Vec<f32> {
    let query = Query {
        q,
        keys,
        values,
        kv_h,
        range: range.clone(),
        scale,
    };
    let mut scores = vec![0f32; range.len()];
    let mut out = vec![0f32; q.len()];
    let total = match path {
        Path::Portable => query.attend(&mut scores, &mut out),
        Path::Vector => {
            assert!(simd::available() && q.len().is_multiple_of(8));
            // SAFETY: checked just above: the CPU runs it, and the head size is whole vectors.
            unsafe { simd::attend(&query, &mut scores, &mut out) }
        }
    };
    out.iter().map(|o| o / total).collect()
}

/// `one_query`, for whichever format `cache` has.
fn attend_by(
    cache: &KvCache,
    q: &[f32],
    kv_h: usize,
    range: std::ops::Range<usize>,
    scale: f32,
    path: Path,
) -> Vec<f32> {
    match cache.rows() {
        Rows::F32(k, v) => one_query((k, v), q, kv_h, range, scale, path),
        Rows::F16(k, v) => one_query((k, v), q, kv_h, range, scale, path),
        Rows::Q8(k, v) => one_query((k, v), q, kv_h, range, scale, path),
    }
}

/// The portable path with a scale of 0.2, for whichever format `cache` has.
fn expected(cache: &KvCache, q: &[f32], kv_h: usize, range: std::ops::Range<usize>) -> Vec<f32> {
    attend_by(cache, q, kv_h, range, 0.2, Path::Portable)
}

/// One query (decoding): the vector path equals the portable one for every cache format.
/// The long cache spans three pages and two heads, so the rows asked for ahead
/// (`simd::prefetch_rows`, 16 KiB: 102-409 rows here) fall in the next page, the next
/// head's rows or past the last key.
#[test]
fn vector_and_portable_attention_agree() {
    if !simd::available() {
        return;
    }
    let d = 40;
    let short = [0..40, 13..40, 5..11, 7..8];
    let long = [0..600, 250..600, 0..257, 511..600, 255..256, 100..530];
    for (n, kv_heads, ranges) in [(40, 1, &short[..]), (600, 2, &long[..])] {
        let (keys, values) = (noise(1, kv_heads * n * d), noise(2, kv_heads * n * d));
        let q = noise(3, d);
        for kind in KvCacheType::ALL {
            let cache = cache(kind, kv_heads, d, &keys, &values);
            // All keys, a window's tail (a range not starting at 0), counts off multiples of
            // 4, and (long) ranges ending at and across page boundaries.
            for (kv_h, range) in (0..kv_heads).flat_map(|h| ranges.iter().map(move |r| (h, r))) {
                let got = attend_by(&cache, &q, kv_h, range.clone(), 0.2, Path::Vector);
                let want = expected(&cache, &q, kv_h, range.clone());
                for (a, b) in want.iter().zip(&got) {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{kind:?} head {kv_h} {range:?}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// Prompt chunks go key block by key block in tiles of four queries: they equal the portable
/// one-query path for every cache format, tile shape (full, partial), offset, window (one
/// of usize::MAX: "none"), head size (whole and partial slices of outputs) and grouped
/// heads, over many blocks; with a large scale too, so that a query's maximum jumps from
/// block to block and the online softmax rescales what it summed.
#[test]
fn tiled_and_per_query_attention_agree() {
    if !simd::available() {
        return;
    }
    let (heads, kv_heads) = (4, 2);
    for (seq, offset, window, d) in [
        (8, 0, None, 24),
        (13, 5, None, 32),
        (21, 40, Some(10), 16),
        (2, 0, None, 8),
        (17, 100, Some(50), 96),
        (30, 3, Some(4), 8),
        (1, 60, None, 96),
        (64, 0, None, 96),
        (70, 200, Some(100), 96),
        (37, 300, None, 32),
        (9, 20, Some(3), 64),
        (66, 10, None, 128),
        (5, 33, Some(40), 48),
        (40, 30, Some(usize::MAX), 16),
    ] {
        let kv_len = offset + seq;
        let (qd, kd, vd) = (
            noise(1, heads * seq * d),
            noise(2, kv_heads * kv_len * d),
            noise(3, kv_heads * kv_len * d),
        );
        // Both widths of the products (16 lanes where the CPU has AVX-512F).
        for (kind, wide, scale) in KvCacheType::ALL.into_iter().flat_map(|k| {
            [
                (k, false, 0.2),
                (k, true, 0.2),
                (k, false, 3.0),
                (k, true, 3.0),
            ]
        }) {
            let cache = cache(kind, kv_heads, d, &kd, &vd);
            let fast = super::attend(&tensor(&qd, heads, seq, d), &cache, window, scale, wide)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for h in 0..heads {
                for i in 0..seq {
                    let pos = offset + i;
                    let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let q = &qd[(h * seq + i) * d..][..d];
                    let kv_h = h / (heads / kv_heads);
                    let want = attend_by(&cache, q, kv_h, first..pos + 1, scale, Path::Portable);
                    let got = &fast[(h * seq + i) * d..][..d];
                    // Each score sums its head's dimensions in one lane, in order, the
                    // portable path in another order: scores differ by their rounding, up
                    // to ε·scale·d·|q|·|k| (|q|, |k| ≤ 2 here), and the outputs, averages
                    // of values below 2, by about as much; 3e-5 besides for the rest.
                    let bound = 3e-5 + f32::EPSILON * scale * d as f32 * 4.0;
                    for (e, g) in want.iter().zip(got) {
                        assert!(
                            (e - g).abs() < bound,
                            "{kind:?} wide {wide} scale {scale} {seq} {offset} {window:?} {d}: {e} vs {g}"
                        );
                    }
                }
            }
        }
    }
}

/// f16 and 8-bit caches change the output by their rounding only: a weighted average of
/// values off by at most their step.
#[test]
fn compact_formats_stay_close_to_f32() {
    let (heads, d, n) = (2, 96, 300);
    let (qd, kd, vd) = (
        noise(1, heads * d),
        noise(2, heads * n * d),
        noise(3, heads * n * d),
    );
    let q = tensor(&qd, heads, 1, d);
    let out = |kind| {
        let cache = cache(kind, heads, d, &kd, &vd);
        super::attend(&q, &cache, None, 0.3, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let exact = out(KvCacheType::F32);
    // Values lie in [-2, 2]: f16's step there is 2^-10, the 8-bit one 2/127.
    for (kind, bound) in [(KvCacheType::F16, 2e-3), (KvCacheType::Q8_0, 3e-2)] {
        let worst = exact
            .iter()
            .zip(out(kind))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < bound, "{kind:?}: {worst}");
        assert!(worst > 0.0, "{kind:?} rounds nothing: is it f32?");
    }
}

#[test]
fn vector_exp_is_accurate() {
    if !simd::available() {
        return;
    }
    let xs: Vec<f32> = (0..=20_000).map(|i| -100.0 * i as f32 / 20_000.0).collect();
    let mut ours = xs.clone();
    // SAFETY: the CPU checked above.
    let total = unsafe { simd::softmax_numerators(&mut ours, 0.0) };
    let mut sum = 0f64;
    for (&x, &e) in xs.iter().zip(&ours) {
        let exact = f64::from(x).exp();
        sum += exact;
        if x > -87.0 {
            let relative = ((f64::from(e) - exact) / exact).abs();
            assert!(relative < 3e-7, "exp({x}) = {e}, exactly {exact}");
        } else {
            assert!(f64::from(e) < 2e-38, "exp({x}) = {e}");
        }
    }
    assert!(
        (f64::from(total) - sum).abs() < 1e-5 * sum,
        "{total} vs {sum}"
    );
}

/// The sixteen-lane exp is the eight-lane one's steps: the same bits in every lane.
#[test]
fn sixteen_lane_exp_equals_eight_lane_exp() {
    if !simd::has_avx512() {
        return;
    }
    use std::arch::x86_64::*;
    let xs: Vec<f32> = (0..=16_000).map(|i| -100.0 * i as f32 / 16_000.0).collect();
    for chunk in xs.chunks_exact(16) {
        let (mut wide, mut narrow) = ([0f32; 16], [0f32; 16]);
        // SAFETY: the CPU checked above; each chunk holds sixteen values.
        unsafe {
            _mm512_storeu_ps(
                wide.as_mut_ptr(),
                simd::exp16(_mm512_loadu_ps(chunk.as_ptr())),
            );
            for half in 0..2 {
                let x = _mm256_loadu_ps(chunk[8 * half..].as_ptr());
                _mm256_storeu_ps(narrow[8 * half..].as_mut_ptr(), simd::exp(x));
            }
        }
        assert_eq!(
            wide.map(f32::to_bits),
            narrow.map(f32::to_bits),
            "{chunk:?}"
        );
    }
}
