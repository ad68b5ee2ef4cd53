//! Causal self-attention over the KV cache, fused: for one query at a time (in prompt
//! chunks, tiles of queries a block of keys at a time, `tiled.rs`), the scores, their
//! softmax and the weighted sum of the values, so no queries × keys matrix is built (at a
//! 512-token context, Candle's separate matmul, scale, mask and softmax ops cost a sixth of
//! prompt processing). Keys and values are read in the cache's own format (f16, 8-bit or
//! f32) and converted to f32 in registers (a prompt chunk's, one block of keys at a time
//! into scratch): there is no f32 copy of the cache.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kv_cache::{Element, HeadRows, KvCache, Rows};

#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(all(test, target_arch = "x86_64"))]
mod tests;
#[cfg(target_arch = "x86_64")]
mod tiled;

/// Attention of the queries `q` (1, heads, seq, head_dim), the newest `seq` positions of
/// `cache`, to the cached keys: each sees the keys at or before its position, within
/// `window` if there is one. `wide`: prompt chunks may take 16-lane products where the CPU
/// has AVX-512F (`wide_attention` says when a model asks for them).
pub fn attend(
    q: &Tensor,
    cache: &KvCache,
    window: Option<usize>,
    scale: f32,
    wide: bool,
) -> Result<Tensor> {
    q.contiguous()?.apply_op1_no_bwd(&CausalAttention {
        cache,
        window,
        scale,
        wide,
    })
}

/// Whether a model whose matrices run `kernels` asks for 16-lane attention: with AVX-512
/// VNNI's, so that `CANDLE_PHI_KERNELS=avx2` measures a CPU without AVX-512, and CPUs with
/// AVX-512 but no VNNI (Skylake servers, which slow their clock for 512-bit arithmetic)
/// keep 8 lanes.
pub fn wide_attention(kernels: crate::quant::Kernels) -> bool {
    kernels == crate::quant::Kernels::Avx512Vnni
}

struct CausalAttention<'a> {
    cache: &'a KvCache,
    window: Option<usize>,
    scale: f32,
    wide: bool,
}

/// The queries' data, (1, heads, seq, head_dim) contiguous.
struct Queries<'a> {
    data: &'a [f32],
    heads: usize,
    seq: usize,
    head_dim: usize,
}

impl<'a> Queries<'a> {
    fn row(&self, h: usize, n: usize) -> &'a [f32] {
        let at = (h * self.seq + n) * self.head_dim;
        &self.data[at..at + self.head_dim]
    }
}

impl CustomOp1 for CausalAttention<'_> {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(&self, q: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = q else {
            candle_core::bail!("causal-attention: queries must be f32")
        };
        let (&[1, heads, seq, head_dim], Some((start, end))) =
            (layout.dims(), layout.contiguous_offsets())
        else {
            candle_core::bail!(
                "causal-attention: queries must be (1, heads, seq, head_dim), contiguous"
            )
        };
        let kv_heads = self.cache.kv_heads();
        let kv_len = self.cache.len();
        if kv_heads == 0 || heads % kv_heads != 0 || seq > kv_len {
            candle_core::bail!(
                "causal-attention: {heads} query heads and {seq} queries against {kv_heads} heads of {kv_len} keys"
            )
        }
        let q = Queries {
            data: &data[start..end],
            heads,
            seq,
            head_dim,
        };
        let out = match self.cache.rows() {
            Rows::F32(k, v) => self.run(&q, k, v),
            Rows::F16(k, v) => self.run(&q, k, v),
            Rows::Q8(k, v) => self.run(&q, k, v),
        }?;
        Ok((CpuStorage::F32(out), Shape::from((1, heads, seq, head_dim))))
    }
}

/// One query head's rows and the cache head it reads.
struct Head<'a, E: Element> {
    q: &'a Queries<'a>,
    keys: HeadRows<'a, E>,
    values: HeadRows<'a, E>,
    h: usize,
    kv_h: usize,
}

impl CausalAttention<'_> {
    fn run<E: Element>(
        &self,
        q: &Queries<'_>,
        keys: HeadRows<'_, E>,
        values: HeadRows<'_, E>,
    ) -> Result<Vec<f32>> {
        let head_dim = q.head_dim;
        if keys.head_dim() != head_dim {
            candle_core::bail!(
                "causal-attention: queries of {head_dim} against keys of {}",
                keys.head_dim()
            )
        }
        let group = q.heads / self.cache.kv_heads();
        let mut out = vec![0f32; q.heads * q.seq * head_dim];
        out.par_chunks_mut(q.seq * head_dim)
            .enumerate()
            .for_each(|(h, out)| {
                let head = Head {
                    q,
                    keys,
                    values,
                    h,
                    kv_h: h / group,
                };
                #[cfg(target_arch = "x86_64")]
                if self.wide && q.seq > 1 && head_dim.is_multiple_of(16) && simd::has_avx512() {
                    // SAFETY: the CPU has AVX-512F, AVX2, FMA and F16C; the head size is a
                    // multiple of 16.
                    return unsafe { self.head_avx512(&head, out) };
                }
                #[cfg(target_arch = "x86_64")]
                if head_dim.is_multiple_of(8) && simd::available() {
                    // SAFETY: the CPU has AVX2, FMA and F16C; the head size is a multiple of 8.
                    return unsafe { self.head_simd(&head, out) };
                }
                self.head::<E, false>(&head, out)
            });
        Ok(out)
    }

    /// Position of the first query (the cache holds it and every query after it).
    fn offset(&self, head: &Head<'_, impl Element>) -> usize {
        self.cache.len() - head.q.seq
    }

    /// `head` with the AVX2 + FMA inner loops.
    ///
    /// Safety: the CPU must have AVX2, FMA and F16C, and the head size be a multiple of 8.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn head_simd<E: Element>(&self, head: &Head<'_, E>, out: &mut [f32]) {
        let head_dim = head.q.head_dim;
        if out.len() < 2 * head_dim {
            return self.head::<E, true>(head, out); // one query (decode): nothing to share
        }
        self.head_tiled::<tiled::Avx2, E, 4, 2>(head, out)
    }

    /// A prompt chunk's `head` with the products 16 lanes wide.
    ///
    /// Safety: the CPU must have AVX-512F, AVX2, FMA and F16C, and the head size be a
    /// multiple of 16.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn head_avx512<E: Element>(&self, head: &Head<'_, E>, out: &mut [f32]) {
        self.head_tiled::<tiled::Avx512, E, 8, 2>(head, out)
    }

    /// Every query of `head`, key block by key block (`tiled::attend`): tiles of `Q`
    /// queries, `S` output vectors per query in registers.
    ///
    /// Safety: the CPU runs `W`, and the head size is a multiple of `W::LANES`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn head_tiled<W: tiled::Width, E: Element, const Q: usize, const S: usize>(
        &self,
        head: &Head<'_, E>,
        out: &mut [f32],
    ) {
        let rows = head.q.seq * head.q.head_dim;
        let chunk = tiled::Chunk {
            queries: &head.q.data[head.h * rows..(head.h + 1) * rows],
            keys: head.keys,
            values: head.values,
            kv_h: head.kv_h,
            offset: self.offset(head),
            window: self.window,
            scale: self.scale,
        };
        // SAFETY: the caller checked the CPU and the head size; the cache holds every
        // query's position (checked in `cpu_fwd`).
        tiled::attend::<W, E, Q, S>(&chunk, &mut tiled::Scratch::default(), out);
    }

    /// The first key a query at `pos` sees: all before it, or its window's.
    fn first_key(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }

    /// Every query of one head: `out` is (seq, head_dim).
    #[inline(always)]
    fn head<E: Element, const SIMD: bool>(&self, head: &Head<'_, E>, out: &mut [f32]) {
        let head_dim = head.q.head_dim;
        let offset = self.offset(head);
        let mut scores = vec![0f32; offset + out.len() / head_dim];
        for (i, out) in out.chunks_exact_mut(head_dim).enumerate() {
            let pos = offset + i;
            let first = self.first_key(pos);
            let query = Query {
                q: head.q.row(head.h, i),
                keys: head.keys,
                values: head.values,
                kv_h: head.kv_h,
                range: first..pos + 1,
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

/// One query and the cached keys it sees.
struct Query<'a, E: Element> {
    q: &'a [f32],
    keys: HeadRows<'a, E>,
    values: HeadRows<'a, E>,
    kv_h: usize,
    range: Range<usize>,
    scale: f32,
}

impl<E: Element> Query<'_, E> {
    /// `out` = Σ e^(score − max) · value, with `scores` as scratch; returns Σ e^(score − max).
    fn attend(&self, scores: &mut [f32], out: &mut [f32]) -> f32 {
        let mut row = vec![0f32; self.q.len()];
        for (s, j) in scores.iter_mut().zip(self.range.clone()) {
            E::decode(self.keys.row(self.kv_h, j), &mut row);
            *s = dot(self.q, &row) * self.scale;
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut total = 0f32;
        out.fill(0.0);
        for (s, j) in scores.iter_mut().zip(self.range.clone()) {
            *s = (*s - max).exp();
            total += *s;
            E::decode(self.values.row(self.kv_h, j), &mut row);
            for (o, &v) in out.iter_mut().zip(&row) {
                *o += *s * v;
            }
        }
        total
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
