//! candle-phi: run quantized Phi-3 GGUF models with Hugging Face Candle.
//!
//! The engine is plain Rust, one module per concern; the PyO3 bindings live in `bindings`
//! behind the `python` feature so that `cargo test` never links libpython.

pub mod batch;
pub mod chat;
pub mod engine;
pub mod error;
pub mod generation;
pub mod gguf;
mod heap;
#[cfg(target_arch = "x86_64")]
mod lanes;
pub mod logprobs;
pub mod model;
// Kernels and raw weight storage stay inside the crate: their unsafe code relies on
// invariants (CPU features, buffer sizes) that only the loader establishes.
pub mod prefix_cache;
mod quant;
pub mod sampling;
pub mod sandbox;
pub mod source;
pub mod stop;
#[cfg(test)]
mod testing;
pub mod tokenizer;

pub use chat::{ChatMessage, Role};
pub use engine::{Engine, LoadOptions, ModelSource};
pub use error::{Error, Operation, Result};
pub use generation::{FinishReason, Generation, GenerationParams, Piece, Step};
pub use model::KvCacheType;
pub use sampling::SamplingParams;

#[cfg(feature = "python")]
mod bindings;

/// The system allocator, which also holds sandboxed code (chat templates) to its budget.
#[global_allocator]
static ALLOCATOR: sandbox::Allocator = sandbox::Allocator;
