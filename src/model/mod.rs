//! Loading a `phi3` GGUF: header checks, hyperparameters, weights, and the forward pass.

mod attention;
mod config;
mod elementwise;
mod embedding;
mod kv_cache;
mod pass;
mod phi3;
mod rope;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use config::Phi3Config;
pub use kv_cache::{KvCacheType, PAGE};
pub use pass::{forward as forward_batch, Output, Segment};
pub use phi3::{Phi3Model, Phi3Weights, TensorSource, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT};
pub use rope::RopeFactors;

pub use crate::quant::RawTensor;

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, GgufVocab, Value};

impl TensorSource for GgufFile {
    fn tensor(&mut self, name: &str) -> Result<crate::quant::RawTensor> {
        GgufFile::tensor(self, name)
    }

    fn contains(&self, name: &str) -> bool {
        self.tensor_info(name).is_some()
    }
}

/// A tensor source that stops handing out tensors once `interrupt` is set.
struct Interruptible<'a, S> {
    source: &'a mut S,
    interrupt: &'a AtomicBool,
}

impl<S: TensorSource> TensorSource for Interruptible<'_, S> {
    fn tensor(&mut self, name: &str) -> Result<crate::quant::RawTensor> {
        if self.interrupt.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        self.source.tensor(name)
    }

    fn contains(&self, name: &str) -> bool {
        self.source.contains(name)
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
    /// The GGUF's tokenizer: used when no tokenizer.json is given, else checked against it.
    pub vocab: GgufVocab,
}

/// Checks every required tensor's presence, shape and type, then reads the weights.
pub fn load(path: &Path) -> Result<LoadedModel> {
    load_interruptible(path, &AtomicBool::new(false), KvCacheType::default(), true)
}

/// `load`, ending early with `Error::Interrupted` once `interrupt` is set; its sequences
/// store keys and values as `kv_cache_type`; `repack_weights` as `Phi3Weights::load_with`.
pub fn load_interruptible(
    path: &Path,
    interrupt: &AtomicBool,
    kv_cache_type: KvCacheType,
    repack_weights: bool,
) -> Result<LoadedModel> {
    let mut file = GgufFile::open(path, interrupt)?;
    let config = Phi3Config::from_gguf(&file)?;
    let has_long = file.contains(ROPE_FACTORS_LONG);
    let has_short = file.contains(ROPE_FACTORS_SHORT);
    let mut expected_tensors = config.expected_tensors();
    if has_long || has_short {
        // LongRoPE needs both sets of factors, one per rotated dimension pair.
        for name in [ROPE_FACTORS_SHORT, ROPE_FACTORS_LONG] {
            expected_tensors.push((name.to_string(), vec![config.rope_dim / 2]));
        }
    }
    for (name, expected) in expected_tensors {
        let Some(info) = file.tensor_info(&name) else {
            return Err(Error::MissingTensor {
                path: file.path.clone(),
                name,
            });
        };
        let found = info.dims.clone();
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
    let weights = Phi3Weights::load_with(
        config,
        &mut Interruptible {
            source: &mut file,
            interrupt,
        },
        repack_weights,
    )?
    .with_kv_cache_type(kv_cache_type);
    Ok(LoadedModel {
        weights: Arc::new(weights),
        metadata,
    })
}

/// The metadata of the GGUF at `path`, without reading its weights.
pub fn metadata(path: &Path) -> Result<ModelMetadata> {
    Ok(read_metadata(&GgufFile::open_header(path)?))
}

fn read_metadata(file: &GgufFile) -> ModelMetadata {
    let id = |key: &str| {
        file.metadata(key)
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    };
    ModelMetadata {
        chat_template: file
            .metadata("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string),
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        eot_token_id: id("tokenizer.ggml.eot_token_id"),
        vocab: GgufVocab::read(file, config::MAX_VOCAB),
    }
}
