//! Rotary position embedding (the "NeoX" half-split layout that llama.cpp uses for phi3),
//! over the first `rope_dim` dimensions of each head.

use candle_core::{DType, Device, Result, Tensor, D};

use super::config::Phi3Config;

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// (context_length, rope_dim / 2) tables, computed once per model and shared by streams.
    cos: Tensor,
    sin: Tensor,
    rope_dim: usize,
    head_dim: usize,
}

impl RotaryEmbedding {
    pub fn new(config: &Phi3Config, device: &Device) -> Result<Self> {
        let half = config.rope_dim / 2;
        let base = f64::from(config.rope_freq_base);
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / base.powf(2.0 * i as f64 / config.rope_dim as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, config.context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((config.context_length, 1))?;
        let angles = positions.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
            rope_dim: config.rope_dim,
            head_dim: config.head_dim,
        })
    }

    /// Rotates `xs` of shape (batch, heads, seq, head_dim) for positions `offset..offset+seq`.
    pub fn apply(&self, xs: &Tensor, offset: usize) -> Result<Tensor> {
        let seq_len = xs.dim(2)?;
        let cos = self.cos.narrow(0, offset, seq_len)?;
        let sin = self.sin.narrow(0, offset, seq_len)?;
        if self.rope_dim == self.head_dim {
            return candle_nn::rotary_emb::rope(&xs.contiguous()?, &cos, &sin);
        }
        let rotated = xs.narrow(D::Minus1, 0, self.rope_dim)?.contiguous()?;
        let rotated = candle_nn::rotary_emb::rope(&rotated, &cos, &sin)?;
        let passed = xs.narrow(D::Minus1, self.rope_dim, self.head_dim - self.rope_dim)?;
        Tensor::cat(&[&rotated, &passed], D::Minus1)?.contiguous()
    }
}
