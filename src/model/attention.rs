//! Causal self-attention over the KV cache, fused: for one query at a time, the scores,
//! their softmax and the weighted sum of the values, so no queries × keys matrix is built
//! (at a 512-token context, Candle's separate matmul, scale, mask and softmax ops cost a
//! sixth of prompt processing).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

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
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { self.head_fma(&head, out) };
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
    /// `head` compiled with AVX2 and fused multiply-adds.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn head_fma(&self, head: &Head<'_>, out: &mut [f32]) {
        self.head::<true>(head, out)
    }

    /// Every query of one head: `out` is (seq, head_dim).
    #[inline(always)]
    fn head<const FMA: bool>(&self, head: &Head<'_>, out: &mut [f32]) {
        let head_dim = head.q.dims[3];
        let mut scores = vec![0f32; self.offset + out.len() / head_dim];
        for (i, out) in out.chunks_exact_mut(head_dim).enumerate() {
            let pos = self.offset + i;
            let first = self.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let query = head.q.row(head.b, head.h, i);
            let keys = first..pos + 1;
            let scores = &mut scores[keys.clone()];
            let mut max = f32::NEG_INFINITY;
            for (s, j) in scores.iter_mut().zip(keys.clone()) {
                *s = dot::<FMA>(query, head.k.row(head.b, head.kv_h, j)) * self.scale;
                max = max.max(*s);
            }
            let mut total = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            out.fill(0.0);
            for (&p, j) in scores.iter().zip(keys) {
                axpy::<FMA>(p / total, head.v.row(head.b, head.kv_h, j), out);
            }
        }
    }
}

/// `a + b * c`, fused where the build has FMA (`mul_add` without it is a slow call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        b.mul_add(c, a)
    } else {
        a + b * c
    }
}

/// Eight independent partial sums, so the compiler vectorizes without reordering one sum.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
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
            lanes[l] = madd::<FMA>(lanes[l], x[l], y[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `out += alpha * x`.
#[inline(always)]
fn axpy<const FMA: bool>(alpha: f32, x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = madd::<FMA>(*o, alpha, v);
    }
}
