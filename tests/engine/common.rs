//! Deterministic tiny Phi-3 weights, as an in-memory tensor source or a GGUF file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_phi::model::RawTensor;
use candle_phi::model::{Phi3Config, TensorSource};

pub fn config() -> Phi3Config {
    Phi3Config {
        vocab_size: 96,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 4,
        head_dim: 16,
        rope_dim: 16,
        rope_freq_base: 10_000.0,
        rope_original_context: 300,
        rope_attn_factor: None,
        rms_eps: 1e-5,
        context_length: 300,
        sliding_window: None,
        tied_embeddings: false,
    }
}

/// A small linear congruential generator: the same weights on every platform and run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

pub struct Weights(pub HashMap<String, QTensor>);

impl TensorSource for Weights {
    fn tensor(&mut self, name: &str) -> candle_phi::Result<RawTensor> {
        let t = self.0.get(name).expect("test weights have every tensor");
        Ok(RawTensor::from_qtensor(t).expect("tensor bytes"))
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

pub fn weights(config: &Phi3Config, seed: u64, dtype: GgmlDType) -> Weights {
    let mut rng = Lcg(seed);
    let mut out = HashMap::new();
    for (name, shape) in config.expected_tensors() {
        let n: usize = shape.iter().product();
        let scale = if shape.len() == 1 {
            0.0
        } else {
            1.0 / (shape[1] as f32).sqrt()
        };
        let data: Vec<f32> = (0..n)
            .map(|_| {
                let r = rng.next();
                if shape.len() == 1 {
                    1.0 + 0.1 * r
                } else {
                    r * scale * 1.7
                }
            })
            .collect();
        let tensor = Tensor::from_vec(data, shape.as_slice(), &Device::Cpu).unwrap();
        let dtype = if shape.len() == 1 {
            GgmlDType::F32
        } else {
            dtype
        };
        out.insert(name, QTensor::quantize(&tensor, dtype).unwrap());
    }
    Weights(out)
}

/// Writes `weights` with the phi3 metadata of `config` as a GGUF file.
pub fn write_gguf(
    path: &Path,
    config: &Phi3Config,
    weights: &Weights,
    overrides: &[(&str, Option<Value>)],
) {
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("phi3".into())),
        (
            "phi3.context_length".into(),
            Value::U32(config.context_length as u32),
        ),
        (
            "phi3.embedding_length".into(),
            Value::U32(config.hidden_size as u32),
        ),
        (
            "phi3.feed_forward_length".into(),
            Value::U32(config.intermediate_size as u32),
        ),
        (
            "phi3.block_count".into(),
            Value::U32(config.num_layers as u32),
        ),
        (
            "phi3.attention.head_count".into(),
            Value::U32(config.num_heads as u32),
        ),
        (
            "phi3.attention.head_count_kv".into(),
            Value::U32(config.num_kv_heads as u32),
        ),
        (
            "phi3.attention.layer_norm_rms_epsilon".into(),
            Value::F32(config.rms_eps as f32),
        ),
        (
            "phi3.rope.dimension_count".into(),
            Value::U32(config.rope_dim as u32),
        ),
        (
            "phi3.rope.freq_base".into(),
            Value::F32(config.rope_freq_base),
        ),
    ];
    for (key, value) in overrides {
        metadata.retain(|(k, _)| k != key);
        if let Some(value) = value {
            metadata.push((key.to_string(), value.clone()));
        }
    }
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut names: Vec<&String> = weights.0.keys().collect();
    names.sort();
    let tensors: Vec<(&str, &QTensor)> =
        names.iter().map(|n| (n.as_str(), &weights.0[*n])).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}
