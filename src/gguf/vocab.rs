//! What a GGUF says about its tokenizer (`tokenizer.ggml.*` and `general.name`), read once;
//! `tokenizer/gguf.rs` builds the tokenizer from it.

use super::{GgufFile, Value};

/// The most merges a file may list (the largest published vocabularies have ~500k).
const MAX_MERGES: usize = 4 << 20;

/// What a GGUF says about its tokenizer.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: "llama" (SentencePiece), "gpt2" (BPE), ...
    pub model: Option<String>,
    pub pre: Option<String>,
    pub tokens: Option<Vec<String>>,
    pub scores: Option<Vec<f64>>,
    pub token_types: Option<Vec<f64>>,
    pub merges: Option<Vec<String>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub add_space_prefix: Option<bool>,
    /// `general.name`: llama.cpp gives Phi-3's special tokens their right strip by it.
    pub model_name: Option<String>,
}

impl GgufVocab {
    /// Reads the tokenizer metadata; `max_tokens` bounds every array read.
    pub fn read(file: &GgufFile, max_tokens: usize) -> Self {
        let string = |key: &str| {
            file.metadata(key)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let id = |key: &str| {
            file.metadata(key)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
        };
        let flag = |key: &str| match file.metadata(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        };
        Self {
            model: string("tokenizer.ggml.model"),
            pre: string("tokenizer.ggml.pre"),
            tokens: file.metadata_strings("tokenizer.ggml.tokens", max_tokens),
            scores: file.metadata_numbers("tokenizer.ggml.scores", max_tokens),
            token_types: file.metadata_numbers("tokenizer.ggml.token_type", max_tokens),
            merges: file.metadata_strings("tokenizer.ggml.merges", MAX_MERGES),
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_id: id("tokenizer.ggml.eos_token_id"),
            unknown_token_id: id("tokenizer.ggml.unknown_token_id"),
            add_bos_token: flag("tokenizer.ggml.add_bos_token"),
            add_eos_token: flag("tokenizer.ggml.add_eos_token"),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
            model_name: string("general.name"),
        }
    }
}
