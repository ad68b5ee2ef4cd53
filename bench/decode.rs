//! Decode speed with no Python at all: the reference for the cost of the Python iterator.
//! `cargo run --release --example decode -- MODEL.gguf tokenizer.json [TOKENS]`

use std::path::PathBuf;
use std::time::Instant;

use candle_phi::{Engine, GenerationParams, ModelSource, SamplingParams, Step};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, tokenizer, rest @ ..] = args.as_slice() else {
        return Err("usage: decode MODEL.gguf tokenizer.json [TOKENS]".into());
    };
    let tokens: usize = rest.first().map_or(Ok(64), |t| t.parse())?;
    let engine = Engine::load(
        &ModelSource::Local(PathBuf::from(model)),
        Some(&ModelSource::Local(PathBuf::from(tokenizer))),
        false,
        None,
    )?;
    let params = GenerationParams {
        max_tokens: Some(tokens + 1),
        sampling: SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.0,
            ..SamplingParams::default()
        },
        ignore_eos: true,
        ..GenerationParams::default()
    };
    // The same 16-token prompt as bench.py's decode measurement.
    let prompt: Vec<u32> = (0..16).map(|i| 300 + i * 997 % 31000).collect();
    let mut generation = engine.generate_ids(prompt, &params)?;
    // Prompt and first token first; time the tokens after it, as bench.py does.
    while generation.stats().sampled_tokens == 0 {
        generation.step()?;
    }
    let start = Instant::now();
    while generation.step()? != Step::Finished {}
    let decoded = generation.stats().sampled_tokens - 1;
    let tps = decoded as f64 / start.elapsed().as_secs_f64();
    println!("{{\"decode_tps\": {tps}, \"tokens\": {decoded}}}");
    Ok(())
}
