//! The hyperparameters of a `phi3` GGUF, read from the file itself: nothing here assumes
//! Phi-3-mini's numbers.

use candle_core::quantized::gguf_file::Value;

use super::gguf::GgufFile;
use crate::error::{Error, Result};

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
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(invalid(file, "general.architecture", "not a string")),
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

        let num_heads = required(file, "phi3.attention.head_count")?;
        let hidden_size = required(file, "phi3.embedding_length")?;
        let num_kv_heads = optional(file, "phi3.attention.head_count_kv")?.unwrap_or(num_heads);
        let head_dim = match optional(file, "phi3.attention.key_length")? {
            Some(d) => d,
            None => hidden_size / num_heads,
        };
        let context_length = required(file, "phi3.context_length")?;
        let config = Phi3Config {
            vocab_size: embedding_rows(file)?,
            hidden_size,
            intermediate_size: required(file, "phi3.feed_forward_length")?,
            num_layers: required(file, "phi3.block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_dim: optional(file, "phi3.rope.dimension_count")?.unwrap_or(head_dim),
            rope_freq_base: optional_f32(file, "phi3.rope.freq_base")?.unwrap_or(10_000.0),
            rms_eps: f64::from(required_f32(file, "phi3.attention.layer_norm_rms_epsilon")?),
            context_length,
            rope_original_context: optional(file, "phi3.rope.scaling.original_context_length")?
                .filter(|&n| n > 0)
                .unwrap_or(context_length),
            rope_attn_factor: optional_f32(file, "phi3.rope.scaling.attn_factor")?,
            sliding_window: optional(file, "phi3.attention.sliding_window")?.filter(|&w| w > 0),
            tied_embeddings: !file.content.tensor_infos.contains_key("output.weight"),
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
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return Err(invalid(
                file,
                "phi3.attention.layer_norm_rms_epsilon",
                &format!("{} is not a non-negative number", self.rms_eps),
            ));
        }
        Ok(())
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

    /// Bytes the KV cache holds per token (keys and values, f32, all layers).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }
}

fn embedding_rows(file: &GgufFile) -> Result<usize> {
    match file.content.tensor_infos.get("token_embd.weight") {
        Some(info) => Ok(info.shape.dims().first().copied().unwrap_or(0)),
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
    let n = match value {
        Value::U8(v) => u64::from(*v),
        Value::U16(v) => u64::from(*v),
        Value::U32(v) => u64::from(*v),
        Value::U64(v) => *v,
        Value::I8(v) => u64::try_from(*v).map_err(|_| invalid(file, key, "negative"))?,
        Value::I16(v) => u64::try_from(*v).map_err(|_| invalid(file, key, "negative"))?,
        Value::I32(v) => u64::try_from(*v).map_err(|_| invalid(file, key, "negative"))?,
        Value::I64(v) => u64::try_from(*v).map_err(|_| invalid(file, key, "negative"))?,
        other => {
            return Err(invalid(
                file,
                key,
                &format!("expected an integer, found {}", value_kind(other)),
            ))
        }
    };
    usize::try_from(n)
        .map(Some)
        .map_err(|_| invalid(file, key, "too large"))
}

fn required(file: &GgufFile, key: &str) -> Result<usize> {
    match optional(file, key)? {
        Some(0) => Err(invalid(file, key, "must be positive, found 0")),
        Some(n) => Ok(n),
        None => Err(missing(file, key)),
    }
}

fn optional_f32(file: &GgufFile, key: &str) -> Result<Option<f32>> {
    Ok(match file.metadata(key) {
        None => None,
        Some(Value::F32(v)) => Some(*v),
        Some(Value::F64(v)) => Some(*v as f32),
        Some(other) => {
            return Err(invalid(
                file,
                key,
                &format!("expected a float, found {}", value_kind(other)),
            ))
        }
    })
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

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Bool(_) => "a bool",
        Value::F32(_) | Value::F64(_) => "a float",
        _ => "an integer",
    }
}
