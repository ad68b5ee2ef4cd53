//! Rotary position embedding (the "NeoX" half-split layout that llama.cpp uses for phi3),
//! over the first `rope_dim` dimensions of each head, with Phi-3's LongRoPE: per-dimension
//! frequency factors (short within the original context, long beyond it) and an attention
//! scaling factor applied to cos and sin.

use candle_core::{DType, Device, Result, Tensor, D};

use super::config::Phi3Config;

/// LongRoPE's two sets of per-dimension factors, `rope_dim / 2` each.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFactors {
    pub short: Vec<f32>,
    pub long: Vec<f32>,
}

/// The inverse frequencies of one sequence: computed per forward pass for the positions at
/// hand, so no table the size of the context (which is 128k for some Phi models) is kept.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// (1, rope_dim / 2)
    inv_freq: Tensor,
    /// Multiplies cos and sin (LongRoPE's attention factor; 1 otherwise).
    scale: f64,
    rope_dim: usize,
    head_dim: usize,
    /// Whether LongRoPE's long factors were chosen.
    pub long_factors: bool,
}

impl RotaryEmbedding {
    /// The rotation of a sequence that will span `span` positions: LongRoPE's long factors
    /// when that exceeds the original context, its short factors otherwise.
    pub fn new(
        config: &Phi3Config,
        factors: Option<&RopeFactors>,
        span: usize,
        device: &Device,
    ) -> Result<Self> {
        let half = config.rope_dim / 2;
        let base = f64::from(config.rope_freq_base);
        let long_factors = Self::uses_long_factors(config, factors, span);
        let chosen = factors.map(|f| if long_factors { &f.long } else { &f.short });
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let factor = chosen.map_or(1.0, |f| f64::from(f[i]));
                (1.0 / (factor * base.powf(2.0 * i as f64 / config.rope_dim as f64))) as f32
            })
            .collect();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv_freq, (1, half), device)?,
            scale: attention_factor(config, factors.is_some()),
            rope_dim: config.rope_dim,
            head_dim: config.head_dim,
            long_factors,
        })
    }

    /// LongRoPE's long factors serve sequences longer than the original context.
    pub fn uses_long_factors(
        config: &Phi3Config,
        factors: Option<&RopeFactors>,
        span: usize,
    ) -> bool {
        factors.is_some() && span > config.rope_original_context
    }

    /// cos and sin (seq_len, rope_dim / 2) for positions `offset..offset + seq_len`.
    pub fn tables(&self, offset: usize, seq_len: usize) -> Result<(Tensor, Tensor)> {
        let positions = Tensor::arange(
            offset as u32,
            (offset + seq_len) as u32,
            self.inv_freq.device(),
        )?
        .to_dtype(DType::F32)?
        .reshape((seq_len, 1))?;
        let angles = positions.broadcast_mul(&self.inv_freq)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        if self.scale == 1.0 {
            Ok((cos, sin))
        } else {
            Ok(((cos * self.scale)?, (sin * self.scale)?))
        }
    }

    /// Rotates `xs` (batch, heads, seq, head_dim) with tables from [`Self::tables`].
    pub fn apply(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.rope_dim == self.head_dim {
            return candle_nn::rotary_emb::rope(&xs.contiguous()?, cos, sin);
        }
        let rotated = xs.narrow(D::Minus1, 0, self.rope_dim)?.contiguous()?;
        let rotated = candle_nn::rotary_emb::rope(&rotated, cos, sin)?;
        let passed = xs.narrow(D::Minus1, self.rope_dim, self.head_dim - self.rope_dim)?;
        Tensor::cat(&[&rotated, &passed], D::Minus1)?.contiguous()
    }
}

/// The GGUF's `rope.scaling.attn_factor` when given; for LongRoPE without it, the factor
/// llama.cpp's converter and Hugging Face derive from the context extension.
fn attention_factor(config: &Phi3Config, long_rope: bool) -> f64 {
    if let Some(factor) = config.rope_attn_factor {
        return f64::from(factor);
    }
    let (ctx, orig) = (
        config.context_length as f64,
        config.rope_original_context as f64,
    );
    if long_rope && ctx > orig && orig > 1.0 {
        (1.0 + (ctx / orig).ln() / orig.ln()).sqrt()
    } else {
        1.0
    }
}
