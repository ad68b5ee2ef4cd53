//! candle-phi: run quantized Phi-3 GGUF models with Hugging Face Candle.
//!
//! The engine is plain Rust, one module per concern; the PyO3 bindings live in `bindings`
//! behind the `python` feature so that `cargo test` never links libpython.

pub mod chat;
pub mod engine;
pub mod error;
pub mod generation;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod source;
pub mod stop;
pub mod tokenizer;

pub use chat::{ChatMessage, Role};
pub use engine::{Engine, ModelSource};
pub use error::{Error, Result};
pub use generation::{FinishReason, Generation, GenerationParams, Step};
pub use sampling::SamplingParams;

#[cfg(feature = "python")]
mod bindings;
