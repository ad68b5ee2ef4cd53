//! The Phi-3 forward pass on Candle's ops and quantized matmuls.
//!
//! Our own module rather than `candle_transformers::models::quantized_phi3`, which hard-codes
//! the RoPE base, cannot rotate part of a head, needs `output.weight`, and allocates an f32
//! KV cache for the whole context up front.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{Device, Result};
use candle_nn::RmsNorm;

use super::config::Phi3Config;
use super::embedding::Embedding;
use super::kv_cache::{KvCache, KvCacheType};
use super::rope::{RopeFactors, RotaryEmbedding};
use crate::quant::{Kernels, Linear, RawTensor};

#[derive(Debug)]
pub(super) struct Layer {
    pub(super) attn_norm: RmsNorm,
    pub(super) attn_qkv: Linear,
    pub(super) attn_output: Linear,
    pub(super) ffn_norm: RmsNorm,
    /// Gate and up projections fused: the first `intermediate_size` rows are the gate.
    pub(super) ffn_up: Linear,
    pub(super) ffn_down: Linear,
}

/// The immutable weights of one model, shared (`Arc`) by every stream of a generator.
#[derive(Debug)]
pub struct Phi3Weights {
    pub config: Phi3Config,
    pub(super) embeddings: Embedding,
    pub(super) layers: Vec<Layer>,
    pub(super) output_norm: RmsNorm,
    pub(super) output: Linear,
    rope_factors: Option<RopeFactors>,
    /// The kernels its matrices run, by `CANDLE_PHI_KERNELS`'s names.
    pub kernels: &'static str,
    /// Whether its prompt attention asks for 16 lanes (`attention::wide_attention`).
    pub(super) wide_attention: bool,
    /// How every sequence of this model stores its keys and values.
    pub kv_cache_type: KvCacheType,
}

/// A source of named tensors (the mapped GGUF, or a test's in-memory map).
pub trait TensorSource {
    fn tensor(&mut self, name: &str) -> crate::Result<RawTensor>;
    fn contains(&self, name: &str) -> bool;
}

pub const ROPE_FACTORS_SHORT: &str = "rope_factors_short.weight";
pub const ROPE_FACTORS_LONG: &str = "rope_factors_long.weight";

impl Phi3Weights {
    /// The weights `source` holds, Q4_K, Q5_K, Q6_K and Q4_0 matrices repacked (`load_with`).
    pub fn load(config: Phi3Config, source: &mut impl TensorSource) -> crate::Result<Self> {
        Self::load_with(config, source, true)
    }

    /// `repack_weights`: Q4_K, Q5_K, Q6_K and Q4_0 matrices are repacked eight rows to a
    /// block, in place of the file's pages (`quant::QMatrix::repack`,
    /// `quant::LegacyMatrix::repack`); else every matrix reads the file.
    pub fn load_with(
        config: Phi3Config,
        source: &mut impl TensorSource,
        repack_weights: bool,
    ) -> crate::Result<Self> {
        let kernels = Kernels::selected()?;
        let linear = |tensor: &RawTensor| Linear::new(tensor, kernels, repack_weights);
        let token_embd = source.tensor("token_embd.weight")?;
        let embeddings = Embedding::new(&token_embd).map_err(build_error("token_embd.weight"))?;
        let output = if config.tied_embeddings {
            linear(&token_embd).map_err(build_error("token_embd.weight"))?
        } else {
            // A lookup reads only its tokens' rows: the table's pages, faulted in with the
            // file's, go back until a prompt asks for them (53 MiB of Phi-3-mini's Q4_K
            // file that no token would otherwise touch).
            token_embd.bytes().release();
            drop(token_embd);
            matmul(source, "output.weight", linear)?
        };
        let output_norm = norm(source, "output_norm.weight", config.rms_eps)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("blk.{i}");
            layers.push(Layer {
                attn_norm: norm(source, &format!("{p}.attn_norm.weight"), config.rms_eps)?,
                attn_qkv: matmul(source, &format!("{p}.attn_qkv.weight"), linear)?,
                attn_output: matmul(source, &format!("{p}.attn_output.weight"), linear)?,
                ffn_norm: norm(source, &format!("{p}.ffn_norm.weight"), config.rms_eps)?,
                ffn_up: matmul(source, &format!("{p}.ffn_up.weight"), linear)?,
                ffn_down: matmul(source, &format!("{p}.ffn_down.weight"), linear)?,
            });
        }
        let rope_factors = if source.contains(ROPE_FACTORS_LONG) {
            Some(RopeFactors {
                short: vector(source, ROPE_FACTORS_SHORT)?,
                long: vector(source, ROPE_FACTORS_LONG)?,
            })
        } else {
            None
        };
        Ok(Self {
            config,
            embeddings,
            layers,
            output_norm,
            output,
            rope_factors,
            kernels: kernels.name(),
            wide_attention: super::attention::wide_attention(kernels),
            kv_cache_type: KvCacheType::default(),
        })
    }

    /// The kernels its matrices run, naming the tensor types left to Candle's (what
    /// benchmarks report): "avx2", or "avx2; candle for Q8_K" (every type a file holds in
    /// practice runs on ours; Candle's take what else it can load, or forced).
    pub fn kernels_report(&self) -> String {
        let mut candle: Vec<String> = Vec::new();
        for dtype in self.matrices().filter_map(Linear::left_to_candle) {
            // ggml's names: Q8_K, not Candle's Q8K.
            let name = format!("{dtype:?}").replace("8K", "8_K");
            if !candle.contains(&name) {
                candle.push(name);
            }
        }
        let mut report = match (self.kernels, candle.is_empty()) {
            (name, true) | (name @ "candle", false) => name.to_string(),
            (name, false) => format!("{name}; candle for {}", candle.join(", ")),
        };
        let repacked: usize = self.matrices().map(Linear::repacked_bytes).sum();
        if repacked > 0 {
            let mib = repacked as f64 / (1 << 20) as f64;
            report.push_str(&format!("; repacked by 8 rows ({mib:.0} MiB)"));
        }
        report
    }

    /// Every weight matrix: each layer's, then the output's.
    fn matrices(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.attn_qkv, &l.attn_output, &l.ffn_up, &l.ffn_down])
            .chain(std::iter::once(&self.output))
    }

    pub fn with_kv_cache_type(self, kv_cache_type: KvCacheType) -> Self {
        Self {
            kv_cache_type,
            ..self
        }
    }
}

/// A tensor Candle cannot build from the file is a fault of the file, found at load.
fn build_error(name: &str) -> impl Fn(candle_core::Error) -> crate::Error + '_ {
    move |e| crate::Error::InvalidTensor {
        name: name.to_string(),
        detail: crate::error::candle_message(&e),
    }
}

fn matmul(
    source: &mut impl TensorSource,
    name: &str,
    linear: impl Fn(&RawTensor) -> candle_core::Result<Linear>,
) -> crate::Result<Linear> {
    linear(&source.tensor(name)?).map_err(build_error(name))
}

fn vector(source: &mut impl TensorSource, name: &str) -> crate::Result<Vec<f32>> {
    source
        .tensor(name)?
        .to_qtensor()
        .and_then(|t| t.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .map_err(build_error(name))
}

fn norm(source: &mut impl TensorSource, name: &str, eps: f64) -> crate::Result<RmsNorm> {
    let weight = source
        .tensor(name)?
        .to_qtensor()
        .and_then(|t| t.dequantize(&Device::Cpu))
        .map_err(build_error(name))?;
    Ok(RmsNorm::new(weight, eps))
}

/// One sequence being computed: shared weights plus this sequence's own KV cache. Not
/// `Clone`: the cache's buffers would be shared, and appending writes into them.
#[derive(Debug)]
pub struct Phi3Model {
    weights: Arc<Phi3Weights>,
    rope: RotaryEmbedding,
    caches: Vec<KvCache>,
    /// When set, a forward pass stops at the next layer (and the cache is rolled back).
    interrupt: Option<Arc<AtomicBool>>,
}

impl Phi3Model {
    /// A sequence that will span at most `span` positions; LongRoPE models pick their
    /// short or long frequency factors from it, once, so all chunkings agree.
    pub fn new(weights: Arc<Phi3Weights>, span: usize) -> Result<Self> {
        let config = &weights.config;
        let rope = RotaryEmbedding::new(config, weights.rope_factors.as_ref(), span, &Device::Cpu)?;
        // This request never needs more than its span; a later one continuing the sequence
        // (prefix reuse) may need up to the context.
        let caches = (0..config.num_layers)
            .map(|_| {
                KvCache::new(
                    weights.kv_cache_type,
                    config.num_kv_heads,
                    config.head_dim,
                    span.min(config.context_length),
                )
            })
            .collect();
        Ok(Self {
            weights,
            rope,
            caches,
            interrupt: None,
        })
    }

    /// Whether this sequence's state can serve a new request spanning `span` positions:
    /// LongRoPE models must rotate with the same factors.
    pub fn serves_span(&self, span: usize) -> bool {
        let w = &self.weights;
        self.rope.long_factors
            == RotaryEmbedding::uses_long_factors(&w.config, w.rope_factors.as_ref(), span)
    }

    /// This sequence's first `keep` tokens, continued for a request spanning `span`
    /// positions (check [`Self::serves_span`] first).
    pub fn resume(mut self, keep: usize, span: usize) -> Self {
        let max_len = span.min(self.weights.config.context_length);
        for cache in &mut self.caches {
            cache.truncate(keep);
            cache.set_max_len(max_len);
        }
        self.interrupt = None;
        self
    }

    /// A new sequence with a copy of this one's first `keep` tokens, for a request spanning
    /// `span` positions (check [`Self::serves_span`] first).
    pub fn fork(&self, keep: usize, span: usize) -> Result<Self> {
        let max_len = span.min(self.weights.config.context_length);
        Ok(Self {
            weights: Arc::clone(&self.weights),
            rope: self.rope.clone(),
            caches: self
                .caches
                .iter()
                .map(|c| c.copy_prefix(keep, max_len))
                .collect(),
            interrupt: None,
        })
    }

    /// A flag that, once set, stops forward passes between layers with an error; the
    /// cache is then as it was before the pass.
    pub fn set_interrupt(&mut self, flag: Arc<AtomicBool>) {
        self.interrupt = Some(flag);
    }

    /// How many tokens the model has seen: the position of the next token.
    pub fn position(&self) -> usize {
        self.caches.first().map_or(0, KvCache::len)
    }

    /// Tokens the KV buffers are sized for now (allocated; written only as far as held).
    pub fn kv_capacity(&self) -> usize {
        self.caches.first().map_or(0, KvCache::capacity)
    }

    /// Bytes allocated for this sequence's KV cache.
    pub fn kv_cache_bytes(&self) -> usize {
        self.caches.iter().map(KvCache::bytes).sum()
    }

    pub(super) fn weights(&self) -> &Arc<Phi3Weights> {
        &self.weights
    }

    pub(super) fn rope(&self) -> &RotaryEmbedding {
        &self.rope
    }

    pub(super) fn cache(&self, layer: usize) -> &KvCache {
        &self.caches[layer]
    }

    pub(super) fn cache_mut(&mut self, layer: usize) -> &mut KvCache {
        &mut self.caches[layer]
    }

    pub(crate) fn interrupt_flag(&self) -> Option<&Arc<AtomicBool>> {
        self.interrupt.as_ref()
    }

    /// Forgets every token from `position` on (a pass rolled back).
    pub(crate) fn truncate(&mut self, position: usize) {
        for cache in &mut self.caches {
            cache.truncate(position);
        }
    }
}
