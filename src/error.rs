//! The one error type of the engine. Every message says what was wrong and what to do;
//! the Python bindings map each variant onto one exception class.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // -- model file ---------------------------------------------------------------------
    #[error("model file not found: {}. Check the path, or leave it out to use the Hugging Face hub", path.display())]
    ModelNotFound { path: PathBuf },

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{} is not a GGUF file (it starts with {found}, a GGUF file starts with \"GGUF\"). Pass a .gguf model file", path.display())]
    NotGguf { path: PathBuf, found: String },

    #[error("{} is truncated: {detail}. The file is incomplete; download it again", path.display())]
    Truncated { path: PathBuf, detail: String },

    #[error("{} is not a valid GGUF file: {detail}", path.display())]
    InvalidGguf { path: PathBuf, detail: String },

    #[error("{} holds a '{found}' model, but candle-phi runs only 'phi3' GGUF models (Phi-3, Phi-3.5, Phi-4-mini)", path.display())]
    WrongArchitecture { path: PathBuf, found: String },

    #[error("{} lacks the metadata key '{key}' ({detail}); the file was not converted as a phi3 model", path.display())]
    MissingKey {
        path: PathBuf,
        key: String,
        detail: String,
    },

    #[error("{}: metadata key '{key}' has an invalid value: {detail}", path.display())]
    InvalidKey {
        path: PathBuf,
        key: String,
        detail: String,
    },

    #[error("{} lacks the tensor '{name}' that a phi3 model needs; the file is incomplete or not a phi3 model", path.display())]
    MissingTensor { path: PathBuf, name: String },

    #[error("{}: tensor '{name}' has shape {found:?}, but the metadata implies {expected:?}", path.display())]
    TensorShape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },

    #[error("cannot load the tensor '{name}': {detail}. The file is damaged, or was written by a tool that candle-phi does not support")]
    InvalidTensor { name: String, detail: String },

    #[error("{}: tensor '{name}' has type {dtype}, which Candle cannot load. Use a file quantized to F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or a K-quant (Q2_K..Q6_K, e.g. Q4_K_M)", path.display())]
    UnsupportedTensorType {
        path: PathBuf,
        name: String,
        dtype: String,
    },

    // -- Hugging Face hub ---------------------------------------------------------------
    #[error("could not fetch '{filename}' from the Hugging Face repo '{repo_id}' (revision '{revision}'): {detail}. Check the names and your network, or pass local paths")]
    Download {
        repo_id: String,
        filename: String,
        revision: String,
        detail: String,
    },

    #[error("'{filename}' of '{repo_id}' (revision '{revision}') is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set. Unset HF_HUB_OFFLINE to download it, or pass a local path", cache.display())]
    NotCached {
        repo_id: String,
        filename: String,
        revision: String,
        cache: PathBuf,
    },

    #[error("cannot find the Hugging Face cache: {detail}. Set HF_HUB_CACHE or HF_HOME, or pass local paths")]
    NoCacheDir { detail: String },

    // -- tokenizer ------------------------------------------------------------------------
    #[error("tokenizer file not found: {}. Pass the path of the model's tokenizer.json", path.display())]
    TokenizerNotFound { path: PathBuf },

    #[error("{} is not a valid tokenizer.json: {detail}", path.display())]
    TokenizerInvalid { path: PathBuf, detail: String },

    #[error("the tokenizer in {} cannot be used: {detail}. Pass the model's tokenizer.json (tokenizer=...)", path.display())]
    GgufTokenizer { path: PathBuf, detail: String },

    #[error("the tokenizer does not match the model: {detail}. Use the tokenizer.json of the model the GGUF was converted from")]
    TokenizerMismatch { detail: String },

    #[error("tokenization failed: {detail}")]
    Tokenization { detail: String },

    // -- arguments --------------------------------------------------------------------------
    #[error("invalid {name}: {value}. {expected}")]
    InvalidArgument {
        name: String,
        value: String,
        expected: String,
    },

    #[error("the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: {} tokens in all, more than the model's context length of {context_length}. Shorten the prompt or lower max_tokens", prompt_tokens + max_tokens)]
    ContextLength {
        prompt_tokens: usize,
        max_tokens: usize,
        context_length: usize,
    },

    // -- generation ---------------------------------------------------------------------------
    #[error("generation failed: {detail}")]
    Generation { detail: String },

    #[error("the chat template failed: {detail}")]
    Template { detail: String },

    /// Work stopped because the caller asked (Ctrl-C); the bindings raise KeyboardInterrupt.
    #[error("interrupted")]
    Interrupted,

    /// A bug of ours (a panic) caught at the boundary, reported instead of crashing.
    #[error("internal error while {operation}: {detail}. This is a bug in candle-phi; please report it with the input that caused it")]
    Internal {
        operation: Operation,
        detail: String,
    },
}

/// What an entry point was doing, for internal errors and their exception class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Loading,
    Tokenizing,
    RenderingTemplate,
    Generating,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Loading => "loading the model",
            Operation::Tokenizing => "tokenizing",
            Operation::RenderingTemplate => "rendering the chat template",
            Operation::Generating => "generating",
        })
    }
}

impl Error {
    /// The payload of a caught panic as an internal error.
    pub fn from_panic(operation: Operation, payload: Box<dyn std::any::Any + Send>) -> Self {
        let detail = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        Error::Internal { operation, detail }
    }

    pub(crate) fn invalid_argument(
        name: impl Into<String>,
        value: impl std::fmt::Display,
        expected: impl Into<String>,
    ) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }

    /// A Candle failure while the model runs; Candle's messages are already specific.
    pub(crate) fn generation(err: candle_core::Error) -> Self {
        Error::Generation {
            detail: candle_message(&err),
        }
    }
}

/// Candle's message without the backtrace it attaches when `RUST_BACKTRACE` is set: users
/// get one readable line, never a Rust stack.
pub(crate) fn candle_message(err: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match err {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other.to_string(),
    }
}
