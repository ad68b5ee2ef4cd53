//! Engine tests (`cargo test`): the model, the KV cache, sampling and GGUF checks, on tiny
//! weights built in memory or written with Candle's own GGUF writer. No Python involved.

mod batching;
mod common;
mod gguf_checks;
mod model;
mod sampling;
