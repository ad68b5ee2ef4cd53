//! Decode speed with no Python at all: the reference for the cost of the Python iterator,
//! and, with several streams, the engine's continuous batching alone (no server, no GIL).
//! `cargo run --release --example decode -- MODEL.gguf tokenizer.json [TOKENS] [STREAMS]
//! [CONTEXT] [KV_CACHE_TYPE]`: CONTEXT prompt tokens per stream (16), the cache type f16, q8_0
//! or f32 (f16): decode after a long prompt reads its keys and values at every step.
//!
//! Each stream runs on its own thread, as the Python API's and the server's streams do, and
//! gets its own prompt; the figure is the aggregate decode rate: the tokens after each
//! stream's first, over the time from when all had their first (a barrier) to the last end;
//! beside it, the streams' mean prompt rate (`prompt_tps`: CONTEXT tokens over the time
//! their prompt took).

use std::path::PathBuf;
use std::sync::Barrier;
use std::time::Instant;

use candle_phi::{
    Engine, GenerationParams, KvCacheType, LoadOptions, ModelSource, SamplingParams, Step,
};

/// One stream's run: its decode span, the tokens decoded in it, its prompt's rate.
struct Span {
    start: Instant,
    end: Instant,
    decoded: usize,
    prompt_tps: f64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, tokenizer, rest @ ..] = args.as_slice() else {
        return Err(
            "usage: decode MODEL.gguf tokenizer.json [TOKENS] [STREAMS] [CONTEXT] [KV_CACHE_TYPE] [repacked|mapped]"
                .into(),
        );
    };
    let tokens: usize = rest.first().map_or(Ok(64), |t| t.parse())?;
    let streams: usize = rest.get(1).map_or(Ok(1), |t| t.parse())?;
    let context: u32 = rest.get(2).map_or(Ok(16), |t| t.parse())?;
    let kv_cache_type = match rest.get(3) {
        Some(name) => KvCacheType::from_name(name).ok_or("KV_CACHE_TYPE: f16, q8_0 or f32")?,
        None => KvCacheType::default(),
    };
    let repack_weights = match rest.get(4).map(String::as_str) {
        None | Some("repacked") => true,
        Some("mapped") => false,
        Some(_) => return Err("the weights: repacked (the default) or mapped".into()),
    };
    if streams == 0 || context == 0 {
        return Err("STREAMS and CONTEXT must be at least 1".into());
    }
    let engine = Engine::load(
        &ModelSource::Local(PathBuf::from(model)),
        Some(&ModelSource::Local(PathBuf::from(tokenizer))),
        &LoadOptions {
            kv_cache_type,
            repack_weights,
            ..LoadOptions::default()
        },
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
    let all_started = Barrier::new(streams);
    let spans = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..streams)
            .map(|s| {
                let (engine, params, all_started) = (&engine, &params, &all_started);
                scope.spawn(move || -> candle_phi::Result<Span> {
                    // With 16 tokens, bench.py's decode prompt (stream 0).
                    let prompt: Vec<u32> = (0..context)
                        .map(|i| 300 + (i + context * s as u32) * 997 % 31000)
                        .collect();
                    // Prompt and first token first; time the tokens after it, as bench.py does.
                    let warmed = (|| -> candle_phi::Result<_> {
                        let mut generation = engine.generate_ids(prompt, params)?;
                        while generation.stats().sampled_tokens == 0 {
                            generation.step()?;
                        }
                        Ok(generation)
                    })();
                    // Every thread reaches the barrier, failed or not, so none waits forever.
                    all_started.wait();
                    let mut generation = warmed?;
                    let start = Instant::now();
                    while generation.step()? != Step::Finished {}
                    let stats = generation.stats();
                    Ok(Span {
                        start,
                        end: Instant::now(),
                        decoded: stats.sampled_tokens - 1,
                        prompt_tps: f64::from(context) / stats.prompt_time.as_secs_f64(),
                    })
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a decode thread panicked"))
            .collect::<candle_phi::Result<Vec<_>>>()
    })?;
    // All streams start decoding together (the barrier) and feed the same number of tokens.
    let start = spans
        .iter()
        .map(|s| s.start)
        .min()
        .expect("one stream at least");
    let end = spans
        .iter()
        .map(|s| s.end)
        .max()
        .expect("one stream at least");
    let decoded: usize = spans.iter().map(|s| s.decoded).sum();
    let tps = decoded as f64 / (end - start).as_secs_f64();
    // Each stream's prompt rate, averaged (streams' prompts share passes).
    let prompt_tps = spans.iter().map(|s| s.prompt_tps).sum::<f64>() / spans.len() as f64;
    let (passes, steps) = engine.batcher().pass_counts();
    // What ran where: the CPU's name and the K-quant kernels chosen for it.
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    println!(
        "{{\"decode_tps\": {tps}, \"prompt_tps\": {prompt_tps:.2}, \"tokens\": {decoded}, \
         \"streams\": {streams}, \
         \"context\": {context}, \"kv_cache_type\": {:?}, \"mean_batch\": {:.2}, \
         \"kernels\": {:?}, \"cpu\": {cpu:?}}}",
        kv_cache_type.name(),
        steps as f64 / passes.max(1) as f64,
        engine.kernels()
    );
    Ok(())
}
