//! Causal self-attention over the KV cache, fused: for one query at a time, the scores,
//! their softmax and the weighted sum of the values, so no queries × keys matrix is built
//! (at a 512-token context, Candle's separate matmul, scale, mask and softmax ops cost a
//! sixth of prompt processing).

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod tiled;

/// Attention of `seq` new queries at positions `offset..offset + seq` to the cached keys,
/// each query seeing the keys at or before its position, within `window` if there is one.
pub struct CausalAttention {
    pub offset: usize,
    pub window: Option<usize>,
    pub scale: f32,
}

/// A (batch, heads, positions, head_dim) tensor's data and strides, head_dim contiguous.
struct View<'a> {
    data: &'a [f32],
    start: usize,
    strides: [usize; 3],
    dims: [usize; 4],
}

impl<'a> View<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<Self> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("causal-attention: {what} must be f32")
        };
        let (&[b, h, n, d], &[sb, sh, sn, sd]) = (layout.dims(), layout.stride()) else {
            candle_core::bail!("causal-attention: {what} must have 4 dimensions")
        };
        if sd != 1 && d > 1 {
            candle_core::bail!("causal-attention: {what}'s last dimension must be contiguous")
        }
        Ok(View {
            data,
            start: layout.start_offset(),
            strides: [sb, sh, sn],
            dims: [b, h, n, d],
        })
    }

    fn row(&self, b: usize, h: usize, n: usize) -> &'a [f32] {
        let at = self.start + b * self.strides[0] + h * self.strides[1] + n * self.strides[2];
        &self.data[at..at + self.dims[3]]
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            View::new(q, q_layout, "queries")?,
            View::new(k, k_layout, "keys")?,
            View::new(v, v_layout, "values")?,
        );
        let [batch, heads, seq, head_dim] = q.dims;
        let [_, kv_heads, kv_len, _] = k.dims;
        if kv_heads == 0 || heads % kv_heads != 0 || k.dims != v.dims || k.dims[3] != head_dim {
            candle_core::bail!(
                "causal-attention: queries {:?}, keys {:?}, values {:?}",
                q.dims,
                k.dims,
                v.dims
            )
        }
        if self.offset + seq != kv_len {
            candle_core::bail!(
                "causal-attention: {seq} queries at {} against {kv_len} keys",
                self.offset
            )
        }
        let group = heads / kv_heads;
        let mut out = vec![0f32; batch * heads * seq * head_dim];
        out.par_chunks_mut(seq * head_dim)
            .enumerate()
            .for_each(|(bh, out)| {
                let (b, h) = (bh / heads, bh % heads);
                let head = Head {
                    q: &q,
                    k: &k,
                    v: &v,
                    b,
                    h,
                    kv_h: h / group,
                };
                #[cfg(target_arch = "x86_64")]
                if head_dim.is_multiple_of(8)
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA; the head size is a multiple of 8.
                    return unsafe { self.head_simd(&head, out) };
                }
                self.head::<false>(&head, out)
            });
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, heads, seq, head_dim)),
        ))
    }
}

/// One (batch, head) pair's rows.
struct Head<'a> {
    q: &'a View<'a>,
    k: &'a View<'a>,
    v: &'a View<'a>,
    b: usize,
    h: usize,
    kv_h: usize,
}

impl CausalAttention {
    /// `head` with the AVX2 + FMA inner loops.
    ///
    /// Safety: the CPU must have AVX2 and FMA, and the head size be a multiple of 8.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn head_simd(&self, head: &Head<'_>, out: &mut [f32]) {
        use tiled::TILE;
        let head_dim = head.q.dims[3];
        if out.len() < 2 * head_dim {
            return self.head::<true>(head, out); // one query (decode): nothing to share
        }
        let mut scratch = tiled::Scratch::default();
        for (t, out) in out.chunks_mut(TILE * head_dim).enumerate() {
            let count = out.len() / head_dim;
            let position = |r: usize| self.offset + t * TILE + r;
            let live = |r: usize| r < count;
            let tile = tiled::Tile {
                queries: std::array::from_fn(|r| {
                    head.q
                        .row(head.b, head.h, t * TILE + if live(r) { r } else { 0 })
                }),
                count,
                key: |j| head.k.row(head.b, head.kv_h, j),
                value: |j| head.v.row(head.b, head.kv_h, j),
                // Positions fit i32: the context is at most 2^24 tokens.
                first: std::array::from_fn(|r| match live(r) {
                    true => self.first_key(position(r)) as i32,
                    false => 1,
                }),
                last: std::array::from_fn(|r| if live(r) { position(r) as i32 } else { 0 }),
                scale: self.scale,
            };
            // SAFETY: the caller checked AVX2, FMA and the head size; rows are head_dim
            // long; each live query sees at least its own key, which is in the cache.
            tiled::attend(&tile, &mut scratch, out);
        }
    }

    /// The first key a query at `pos` sees: all before it, or its window's.
    fn first_key(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }

    /// Every query of one head: `out` is (seq, head_dim).
    #[inline(always)]
    fn head<const SIMD: bool>(&self, head: &Head<'_>, out: &mut [f32]) {
        let head_dim = head.q.dims[3];
        let mut scores = vec![0f32; self.offset + out.len() / head_dim];
        for (i, out) in out.chunks_exact_mut(head_dim).enumerate() {
            let pos = self.offset + i;
            let first = self.first_key(pos);
            let query = Query {
                q: head.q.row(head.b, head.h, i),
                key: |j| head.k.row(head.b, head.kv_h, j),
                value: |j| head.v.row(head.b, head.kv_h, j),
                keys: first..pos + 1,
                scale: self.scale,
            };
            let scores = &mut scores[first..pos + 1];
            let total = if SIMD {
                // SAFETY: SIMD is only true inside `head_simd`, whose caller checked the CPU
                // and the head size.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    simd::attend(&query, scores, out)
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("head_simd exists on x86-64 only")
            } else {
                query.attend(scores, out)
            };
            let norm = 1.0 / total;
            out.iter_mut().for_each(|o| *o *= norm);
        }
    }
}

/// One query's view of the cache: its keys and values by position.
struct Query<'a, K, V> {
    q: &'a [f32],
    key: K,
    value: V,
    keys: Range<usize>,
    scale: f32,
}

impl<'a, K: Fn(usize) -> &'a [f32], V: Fn(usize) -> &'a [f32]> Query<'a, K, V> {
    /// `out` = Σ e^(score − max) · value, with `scores` as scratch; returns Σ e^(score − max).
    fn attend(&self, scores: &mut [f32], out: &mut [f32]) -> f32 {
        for (s, j) in scores.iter_mut().zip(self.keys.clone()) {
            *s = dot(self.q, (self.key)(j)) * self.scale;
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut total = 0f32;
        out.fill(0.0);
        for (s, j) in scores.iter_mut().zip(self.keys.clone()) {
            *s = (*s - max).exp();
            total += *s;
            for (o, &v) in out.iter_mut().zip((self.value)(j)) {
                *o += *s * v;
            }
        }
        total
    }
}

/// AVX2 + FMA inner loops for head sizes that are a multiple of 8 (inlined into
/// `head_simd`): four keys per pass, so each query load serves four dot products and each
/// output load and store serves four values.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// `Query::attend`, vectorized.
    #[inline(always)]
    pub unsafe fn attend<'a>(
        query: &super::Query<'a, impl Fn(usize) -> &'a [f32], impl Fn(usize) -> &'a [f32]>,
        scores: &mut [f32],
        out: &mut [f32],
    ) -> f32 {
        self::scores(query.q, &query.key, query.keys.clone(), query.scale, scores);
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let total = softmax_numerators(scores, max);
        out.fill(0.0);
        weighted_sum(scores, &query.value, query.keys.clone(), out);
        total
    }

    /// `scores[n] = scale · query · key(keys.start + n)`.
    #[inline(always)]
    pub unsafe fn scores<'a>(
        query: &[f32],
        key: impl Fn(usize) -> &'a [f32],
        keys: Range<usize>,
        scale: f32,
        scores: &mut [f32],
    ) {
        let d = query.len();
        let q = query.as_ptr();
        let count = keys.len();
        // What the pointer reads below rely on: whole vectors, a key as long as the query.
        debug_assert!(d.is_multiple_of(8) && scores.len() >= count);
        debug_assert!(keys.clone().all(|i| key(i).len() >= d));
        let mut n = 0;
        while n + 4 <= count {
            let k: [*const f32; 4] = std::array::from_fn(|r| key(keys.start + n + r).as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in (0..d).step_by(8) {
                let qv = _mm256_loadu_ps(q.add(c));
                for r in 0..4 {
                    acc[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[r].add(c)), acc[r]);
                }
            }
            // Lane sums of the four, as four floats.
            let h = _mm256_hadd_ps(
                _mm256_hadd_ps(acc[0], acc[1]),
                _mm256_hadd_ps(acc[2], acc[3]),
            );
            let sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            _mm_storeu_ps(
                scores.as_mut_ptr().add(n),
                _mm_mul_ps(sums, _mm_set1_ps(scale)),
            );
            n += 4;
        }
        for (n, score) in scores.iter_mut().enumerate().take(count).skip(n) {
            let k = key(keys.start + n).as_ptr();
            let mut acc = _mm256_setzero_ps();
            for c in (0..d).step_by(8) {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(c)), _mm256_loadu_ps(k.add(c)), acc);
            }
            *score = sum(acc) * scale;
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

    /// e^x for x ≤ 0: 2^n · e^r with n = round(x·log2 e) and r = x − n·ln 2 (in two parts,
    /// so r keeps its precision), |r| ≤ ½ ln 2, and e^r from its Taylor series to degree 7.
    #[inline(always)]
    pub(super) unsafe fn exp(x: __m256) -> __m256 {
        // Below this, e^x is under f32's smallest normal; the result is then ~0, as it should be.
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        // ln 2 = 0.693359375 (exact in a few bits, so n times it is exact) − 2.121944e-4.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let scale = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
        _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), scale))
    }

    /// `out += Σ weights[n] · value(keys.start + n)`.
    #[inline(always)]
    pub unsafe fn weighted_sum<'a>(
        weights: &[f32],
        value: impl Fn(usize) -> &'a [f32],
        keys: Range<usize>,
        out: &mut [f32],
    ) {
        let d = out.len();
        let o = out.as_mut_ptr();
        let count = keys.len();
        // What the pointer reads below rely on: whole vectors, a value as long as `out`.
        debug_assert!(d.is_multiple_of(8) && weights.len() >= count);
        debug_assert!(keys.clone().all(|i| value(i).len() >= d));
        let mut n = 0;
        while n + 4 <= count {
            let v: [*const f32; 4] = std::array::from_fn(|r| value(keys.start + n + r).as_ptr());
            let p: [__m256; 4] = std::array::from_fn(|r| _mm256_set1_ps(weights[n + r]));
            for c in (0..d).step_by(8) {
                let mut acc = _mm256_loadu_ps(o.add(c));
                for r in 0..4 {
                    acc = _mm256_fmadd_ps(p[r], _mm256_loadu_ps(v[r].add(c)), acc);
                }
                _mm256_storeu_ps(o.add(c), acc);
            }
            n += 4;
        }
        for (n, &weight) in weights.iter().enumerate().take(count).skip(n) {
            let v = value(keys.start + n).as_ptr();
            let p = _mm256_set1_ps(weight);
            for c in (0..d).step_by(8) {
                let acc = _mm256_fmadd_ps(p, _mm256_loadu_ps(v.add(c)), _mm256_loadu_ps(o.add(c)));
                _mm256_storeu_ps(o.add(c), acc);
            }
        }
    }
}

/// Eight independent partial sums, so the compiler vectorizes without reordering one sum.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::Query;

    #[test]
    fn vector_and_portable_attention_agree() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let noise = |seed: u32, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000)
                .map(|v| v as f32 / 500.0 - 2.0)
                .collect()
        };
        let d = 24;
        let (keys, values, q) = (noise(1, 40 * d), noise(2, 40 * d), noise(3, d));
        // All keys, a window's tail (a range not starting at 0), and counts off multiples of 4.
        for range in [0..40, 13..40, 5..11, 7..8] {
            let query = Query {
                q: &q,
                key: |j: usize| &keys[j * d..(j + 1) * d],
                value: |j: usize| &values[j * d..(j + 1) * d],
                keys: range.clone(),
                scale: 0.3,
            };
            let (mut s1, mut s2) = (vec![0f32; range.len()], vec![0f32; range.len()]);
            let (mut o1, mut o2) = (vec![0f32; d], vec![0f32; d]);
            let t1 = query.attend(&mut s1, &mut o1);
            // SAFETY: AVX2 and FMA checked above; d is a multiple of 8.
            let t2 = unsafe { super::simd::attend(&query, &mut s2, &mut o2) };
            assert!((t1 - t2).abs() < 1e-5 * t1, "{range:?}: {t1} vs {t2}");
            for (a, b) in o1.iter().zip(&o2) {
                assert!((a - b).abs() < 1e-4 * t1, "{range:?}: {a} vs {b}");
            }
        }
    }
    /// Prompt chunks go through the eight-query tiles: they equal the portable one-query
    /// path for every tile shape (full, partial), offset, window and grouped heads.
    #[test]
    fn tiled_and_per_query_attention_agree() {
        use candle_core::{Device, Tensor};
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let noise = |seed: u32, n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000)
                .map(|v| v as f32 / 500.0 - 2.0)
                .collect()
        };
        let (heads, kv_heads) = (4, 2);
        for (seq, offset, window, d) in [
            (8, 0, None, 24),
            (13, 5, None, 32),
            (21, 40, Some(10), 16),
            (2, 0, None, 8),
            (17, 100, Some(50), 96),
            (30, 3, Some(4), 8),
        ] {
            let kv_len = offset + seq;
            let (qd, kd, vd) = (
                noise(1, heads * seq * d),
                noise(2, kv_heads * kv_len * d),
                noise(3, kv_heads * kv_len * d),
            );
            let tensor = |data: &[f32], h: usize, n: usize| {
                Tensor::from_vec(data.to_vec(), (1, h, n, d), &Device::Cpu).unwrap()
            };
            let op = super::CausalAttention {
                offset,
                window,
                scale: 0.2,
            };
            let fast = tensor(&qd, heads, seq)
                .apply_op3_no_bwd(
                    &tensor(&kd, kv_heads, kv_len),
                    &tensor(&vd, kv_heads, kv_len),
                    &op,
                )
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for h in 0..heads {
                let kv_h = h / (heads / kv_heads);
                for i in 0..seq {
                    let pos = offset + i;
                    let query = Query {
                        q: &qd[(h * seq + i) * d..][..d],
                        key: |j| &kd[(kv_h * kv_len + j) * d..][..d],
                        value: |j| &vd[(kv_h * kv_len + j) * d..][..d],
                        keys: op.first_key(pos)..pos + 1,
                        scale: 0.2,
                    };
                    let mut scores = vec![0f32; query.keys.len()];
                    let mut expected = vec![0f32; d];
                    let total = query.attend(&mut scores, &mut expected);
                    let got = &fast[(h * seq + i) * d..][..d];
                    for (e, g) in expected.iter().zip(got) {
                        assert!(
                            (e / total - g).abs() < 1e-5,
                            "{seq} {offset} {window:?} {d}: {e} vs {g}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn vector_exp_is_accurate() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let xs: Vec<f32> = (0..=20_000).map(|i| -100.0 * i as f32 / 20_000.0).collect();
        let mut ours = xs.clone();
        // SAFETY: AVX2 and FMA checked above.
        let total = unsafe { super::simd::softmax_numerators(&mut ours, 0.0) };
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
}
