//! Loading a `phi3` GGUF: header checks, hyperparameters, weights, and the forward pass.

mod attention;
mod config;
mod embedding;
mod gguf;
mod kv_cache;
mod phi3;
mod rope;

use std::path::Path;
use std::sync::Arc;

pub use config::Phi3Config;
pub use gguf::GgufFile;
pub use phi3::{Phi3Model, Phi3Weights, TensorSource, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT};
pub use rope::RopeFactors;

use crate::error::{Error, Result};

impl TensorSource for GgufFile {
    fn tensor(&mut self, name: &str) -> Result<crate::quant::RawTensor> {
        GgufFile::tensor(self, name)
    }

    fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }
}

/// A loaded model: its hyperparameters, its shared weights, and what the GGUF says about
/// its tokenizer and chat format.
pub struct LoadedModel {
    pub weights: Arc<Phi3Weights>,
    pub metadata: ModelMetadata,
}

/// Metadata beyond the hyperparameters that the tokenizer and chat layers use.
#[derive(Debug, Clone, Default)]
pub struct ModelMetadata {
    pub chat_template: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub eot_token_id: Option<u32>,
    /// The GGUF's own token list, to check a separately supplied tokenizer against.
    pub tokens: Option<Vec<String>>,
}

/// Checks every required tensor's presence, shape and type, then reads the weights.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let mut file = GgufFile::open(path)?;
    let config = Phi3Config::from_gguf(&file)?;
    let has_long = file.content.tensor_infos.contains_key(ROPE_FACTORS_LONG);
    let has_short = file.content.tensor_infos.contains_key(ROPE_FACTORS_SHORT);
    let mut expected_tensors = config.expected_tensors();
    if has_long || has_short {
        // LongRoPE needs both sets of factors, one per rotated dimension pair.
        for name in [ROPE_FACTORS_SHORT, ROPE_FACTORS_LONG] {
            expected_tensors.push((name.to_string(), vec![config.rope_dim / 2]));
        }
    }
    for (name, expected) in expected_tensors {
        let Some(info) = file.content.tensor_infos.get(&name) else {
            return Err(Error::MissingTensor {
                path: file.path.clone(),
                name,
            });
        };
        let found = info.shape.dims().to_vec();
        if found != expected {
            return Err(Error::TensorShape {
                path: file.path.clone(),
                name,
                found,
                expected,
            });
        }
    }
    let metadata = read_metadata(&file);
    let weights = Phi3Weights::load(config, &mut file)?;
    Ok(LoadedModel {
        weights: Arc::new(weights),
        metadata,
    })
}

fn read_metadata(file: &GgufFile) -> ModelMetadata {
    use candle_core::quantized::gguf_file::Value;
    let id = |key: &str| file.metadata(key).and_then(|v| v.to_u32().ok());
    ModelMetadata {
        chat_template: match file.metadata("tokenizer.chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        },
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        eot_token_id: id("tokenizer.ggml.eot_token_id"),
        tokens: match file.metadata("tokenizer.ggml.tokens") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.to_string().ok().cloned())
                .collect::<Option<Vec<_>>>(),
            _ => None,
        },
    }
}
