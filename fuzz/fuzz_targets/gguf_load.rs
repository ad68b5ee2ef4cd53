//! Any bytes as a GGUF file: the header parser, then (when it accepts them) the whole model
//! load, must return `Ok` or an error, never panic, abort or allocate without bound.
//!
//! Run (from the repository root; `cargo install cargo-fuzz` once):
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run gguf_load fuzz/corpus/gguf_load -- -max_total_time=600 -rss_limit_mb=2048
//! `RUSTC_BOOTSTRAP=1` lets the stable toolchain take the sanitizer flags cargo-fuzz passes.

#![no_main]

use std::io::Write;

use candle_phi::gguf::Header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if Header::parse(data).is_err() {
        return;
    }
    // The header is sound: load the whole model from a file, as users do.
    let path = std::env::temp_dir().join(format!("candle-phi-fuzz-{}.gguf", std::process::id()));
    let written = std::fs::File::create(&path).and_then(|mut f| f.write_all(data));
    if written.is_ok() {
        let _ = candle_phi::model::load(&path);
    }
});
