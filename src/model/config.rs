//! The hyperparameters of a `phi3` GGUF, read from the file itself: nothing here assumes
//! Phi-3-mini's numbers.

use super::kv_cache::KvCacheType;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// The largest context a file may state: 16M tokens, 128x Phi-3-mini-128k's. The KV cache
/// grows with use, so this bounds arithmetic, not memory.
pub const MAX_CONTEXT_LENGTH: usize = 1 << 24;
/// The largest hidden or feed-forward size (the largest published models stay below 64k).
pub const MAX_WIDTH: usize = 1 << 18;
/// The most attention heads (query or key/value) and the largest head size.
pub const MAX_HEADS: usize = 1 << 12;
pub const MAX_HEAD_DIM: usize = 1 << 12;
/// The largest vocabulary (the largest published ones have ~256k tokens).
pub const MAX_VOCAB: usize = 1 << 22;

#[derive(Debug, Clone, PartialEq)]
pub struct Phi3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// How many leading dimensions of each head are rotated (partial rotary when < head_dim).
    pub rope_dim: usize,
    pub rope_freq_base: f32,
    /// The context the model was trained with before LongRoPE extended it.
    pub rope_original_context: usize,
    /// LongRoPE's scaling of cos and sin, when the file states it.
    pub rope_attn_factor: Option<f32>,
    pub rms_eps: f64,
    pub context_length: usize,
    /// Each query sees at most this many keys, itself included, when set.
    pub sliding_window: Option<usize>,
    /// No `output.weight`: the output projection reuses the token embedding.
    pub tied_embeddings: bool,
}

impl Phi3Config {
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = match file.metadata("general.architecture") {
            Some(v) => match v.as_str() {
                Some(s) => s.to_string(),
                None => return Err(invalid(file, "general.architecture", "not a string")),
            },
            None => {
                return Err(Error::MissingKey {
                    path: file.path.clone(),
                    key: "general.architecture".into(),
                    detail: "every GGUF model names its architecture".into(),
                })
            }
        };
        if arch != "phi3" {
            return Err(Error::WrongArchitecture {
                path: file.path.clone(),
                found: arch,
            });
        }

        let num_heads = bounded(file, "phi3.attention.head_count", MAX_HEADS)?;
        let hidden_size = bounded(file, "phi3.embedding_length", MAX_WIDTH)?;
        let num_kv_heads = match optional(file, "phi3.attention.head_count_kv")? {
            Some(n) => at_most(file, "phi3.attention.head_count_kv", n, MAX_HEADS)?,
            None => num_heads,
        };
        let head_dim = match optional(file, "phi3.attention.key_length")? {
            Some(d) => at_most(file, "phi3.attention.key_length", d, MAX_HEAD_DIM)?,
            None => hidden_size / num_heads,
        };
        let context_length = bounded(file, "phi3.context_length", MAX_CONTEXT_LENGTH)?;
        // Each block has six tensors, so a file cannot hold more blocks than tensors.
        let tensors = file.header.tensors.len();
        let num_layers = bounded(file, "phi3.block_count", tensors.max(1))?;
        let config = Phi3Config {
            vocab_size: embedding_rows(file)?,
            hidden_size,
            intermediate_size: bounded(file, "phi3.feed_forward_length", MAX_WIDTH)?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_dim: match optional(file, "phi3.rope.dimension_count")? {
                Some(d) => at_most(file, "phi3.rope.dimension_count", d, MAX_HEAD_DIM)?,
                None => head_dim,
            },
            rope_freq_base: optional_f32(file, "phi3.rope.freq_base")?.unwrap_or(10_000.0),
            rms_eps: f64::from(required_f32(file, "phi3.attention.layer_norm_rms_epsilon")?),
            context_length,
            rope_original_context: optional(file, "phi3.rope.scaling.original_context_length")?
                .filter(|&n| n > 0)
                .unwrap_or(context_length),
            rope_attn_factor: optional_f32(file, "phi3.rope.scaling.attn_factor")?,
            sliding_window: optional(file, "phi3.attention.sliding_window")?.filter(|&w| w > 0),
            tied_embeddings: file.tensor_info("output.weight").is_none(),
        };
        config.check(file)?;
        Ok(config)
    }

    fn check(&self, file: &GgufFile) -> Result<()> {
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(invalid(
                file,
                "phi3.attention.head_count_kv",
                &format!(
                    "{} key/value heads do not divide {} attention heads",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(invalid(
                file,
                "phi3.attention.head_count",
                &format!("the head size {} must be even and positive", self.head_dim),
            ));
        }
        if self.rope_dim == 0 || !self.rope_dim.is_multiple_of(2) || self.rope_dim > self.head_dim {
            return Err(invalid(
                file,
                "phi3.rope.dimension_count",
                &format!(
                    "{} rotary dimensions for a head of {}: it must be even, positive and at most the head size",
                    self.rope_dim, self.head_dim
                ),
            ));
        }
        if !(self.rope_freq_base.is_finite() && self.rope_freq_base > 0.0) {
            return Err(invalid(
                file,
                "phi3.rope.freq_base",
                &format!("{} is not a positive number", self.rope_freq_base),
            ));
        }
        if let Some(f) = self.rope_attn_factor {
            if !(f.is_finite() && f > 0.0) {
                return Err(invalid(
                    file,
                    "phi3.rope.scaling.attn_factor",
                    &format!("{f} is not a positive number"),
                ));
            }
        }
        if self.vocab_size > MAX_VOCAB {
            return Err(invalid(
                file,
                "token_embd.weight",
                &format!(
                    "a vocabulary of {} tokens is more than the {MAX_VOCAB} supported",
                    self.vocab_size
                ),
            ));
        }
        // With every dimension bounded above these cannot overflow a u64, but the products
        // used for shapes and sizes are all checked once here, where a file can be named.
        if self.checked_sizes().is_none() {
            return Err(invalid(
                file,
                "phi3.attention.head_count",
                "the model's dimensions multiply past what this machine can address",
            ));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return Err(invalid(
                file,
                "phi3.attention.layer_norm_rms_epsilon",
                &format!("{} is not a non-negative number", self.rms_eps),
            ));
        }
        Ok(())
    }

    /// The products of dimensions the model uses, `None` if any overflows a `usize`.
    fn checked_sizes(&self) -> Option<()> {
        let kv = self.num_kv_heads.checked_mul(2)?;
        self.num_heads.checked_add(kv)?.checked_mul(self.head_dim)?;
        self.num_heads.checked_mul(self.head_dim)?;
        self.intermediate_size.checked_mul(2)?;
        self.vocab_size.checked_mul(self.hidden_size)?;
        self.intermediate_size.checked_mul(self.hidden_size)?;
        self.context_length
            .checked_mul(self.kv_bytes_per_token_checked()?)?;
        Some(())
    }

    /// Bytes per token in f32, the widest cache type.
    fn kv_bytes_per_token_checked(&self) -> Option<usize> {
        2usize
            .checked_mul(self.num_layers)?
            .checked_mul(self.num_kv_heads)?
            .checked_mul(self.head_dim)?
            .checked_mul(std::mem::size_of::<f32>())
    }

    pub fn qkv_dim(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }

    /// The shape each tensor must have, rows first (Candle's order), for the checks at load.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, attn) = (self.hidden_size, self.num_heads * self.head_dim);
        let mut tensors = vec![
            ("token_embd.weight".to_string(), vec![self.vocab_size, h]),
            ("output_norm.weight".to_string(), vec![h]),
        ];
        if !self.tied_embeddings {
            tensors.push(("output.weight".to_string(), vec![self.vocab_size, h]));
        }
        for i in 0..self.num_layers {
            let p = format!("blk.{i}");
            tensors.extend([
                (format!("{p}.attn_norm.weight"), vec![h]),
                (format!("{p}.attn_qkv.weight"), vec![self.qkv_dim(), h]),
                (format!("{p}.attn_output.weight"), vec![h, attn]),
                (format!("{p}.ffn_norm.weight"), vec![h]),
                (
                    format!("{p}.ffn_up.weight"),
                    vec![2 * self.intermediate_size, h],
                ),
                (
                    format!("{p}.ffn_down.weight"),
                    vec![h, self.intermediate_size],
                ),
            ]);
        }
        tensors
    }

    /// Bytes the KV cache holds per token (keys and values, all layers) stored as `kind`.
    pub fn kv_bytes_per_token(&self, kind: KvCacheType) -> usize {
        match self.kv_bytes_per_token_checked() {
            // At most the f32 figure, which fits.
            Some(_) => 2 * self.num_layers * self.num_kv_heads * kind.row_bytes(self.head_dim),
            None => usize::MAX,
        }
    }
}

fn embedding_rows(file: &GgufFile) -> Result<usize> {
    match file.tensor_info("token_embd.weight") {
        Some(info) => Ok(info.dims.first().copied().unwrap_or(0)),
        None => Err(Error::MissingTensor {
            path: file.path.clone(),
            name: "token_embd.weight".into(),
        }),
    }
}

fn invalid(file: &GgufFile, key: &str, detail: &str) -> Error {
    Error::InvalidKey {
        path: file.path.clone(),
        key: key.to_string(),
        detail: detail.to_string(),
    }
}

fn optional(file: &GgufFile, key: &str) -> Result<Option<usize>> {
    let Some(value) = file.metadata(key) else {
        return Ok(None);
    };
    if !value.is_integer() {
        return Err(invalid(
            file,
            key,
            &format!("expected an integer, found {}", value.kind()),
        ));
    }
    let n = value
        .as_u64()
        .ok_or_else(|| invalid(file, key, "negative"))?;
    usize::try_from(n)
        .map(Some)
        .map_err(|_| invalid(file, key, "too large"))
}

/// A value no larger than `max`, the stated limit for that key.
fn at_most(file: &GgufFile, key: &str, n: usize, max: usize) -> Result<usize> {
    if n > max {
        return Err(invalid(
            file,
            key,
            &format!("{n} is more than the {max} supported"),
        ));
    }
    Ok(n)
}

/// A required, positive value no larger than `max`.
fn bounded(file: &GgufFile, key: &str, max: usize) -> Result<usize> {
    let n = required(file, key)?;
    at_most(file, key, n, max)
}

fn required(file: &GgufFile, key: &str) -> Result<usize> {
    match optional(file, key)? {
        Some(0) => Err(invalid(file, key, "must be positive, found 0")),
        Some(n) => Ok(n),
        None => Err(missing(file, key)),
    }
}

fn optional_f32(file: &GgufFile, key: &str) -> Result<Option<f32>> {
    match file.metadata(key) {
        None => Ok(None),
        Some(value) => match value.as_f64() {
            Some(v) => Ok(Some(v as f32)),
            None => Err(invalid(
                file,
                key,
                &format!("expected a float, found {}", value.kind()),
            )),
        },
    }
}

fn required_f32(file: &GgufFile, key: &str) -> Result<f32> {
    optional_f32(file, key)?.ok_or_else(|| missing(file, key))
}

fn missing(file: &GgufFile, key: &str) -> Error {
    Error::MissingKey {
        path: file.path.clone(),
        key: key.to_string(),
        detail: "a required phi3 hyperparameter".into(),
    }
}
