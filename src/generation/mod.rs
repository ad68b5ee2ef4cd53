//! The generation loop as a resumable state machine: each `step` does one bounded piece of
//! work (a prompt chunk or one token), so the caller can check for Ctrl-C or a cancel
//! between pieces and hand text out as soon as it exists.

mod params;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::Tensor;

pub use params::{FinishReason, GenerationParams, Stats};

use crate::batch::{Batcher, Done, Seat};
use crate::error::{Error, Result};
use crate::logprobs::{token_logprob, TokenLogprob, MAX_TOP_LOGPROBS};
use crate::model::{Output, Phi3Model, Phi3Weights};
use crate::prefix_cache::PrefixCache;
use crate::sampling::Sampler;
use crate::stop::{StopOutcome, StopStrings};
use crate::tokenizer::{Phi3Tokenizer, TextStream};

/// Prompt tokens per forward pass: small enough that Ctrl-C or a cancel between chunks
/// lands quickly. Measured on Phi-3-mini shapes, 2 threads: 34, 37 and 34 prompt tokens/s
/// with chunks of 64, 128 and 512, so larger chunks buy no speed with Candle's kernels.
pub const PREFILL_CHUNK: usize = 64;

/// Text released by one step, with the generated tokens it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// Empty only for the last piece, when the tail of the tokens fell to a stop string.
    pub text: String,
    /// Indices into the generated tokens (and their log-probabilities).
    pub tokens: Range<usize>,
}

/// What one `step` produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Work was done but no text is ready yet (a prompt chunk, or a token whose text is
    /// still incomplete).
    Working,
    Text(Piece),
    Finished,
}

/// What another thread reaches of a generation while a step runs: the flags that stop it,
/// and its progress.
#[derive(Debug, Clone, Default)]
pub struct Controls {
    /// Stops the step in progress (Ctrl-C); the generation can go on afterwards.
    pub interrupt: Arc<AtomicBool>,
    /// Ends the generation with `FinishReason::Cancelled` at the next layer.
    pub cancel: Arc<AtomicBool>,
    /// The stats as of the last step, readable without waiting for the step under way.
    progress: Arc<Mutex<Stats>>,
}

impl Controls {
    /// Ends the generation from any thread: the pass in progress stops at its next layer.
    pub fn cancel(&self) {
        // The cancel flag first: a step that clears `interrupt` as it starts then sees it.
        self.cancel.store(true, Ordering::SeqCst);
        self.interrupt.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// The generation's stats as of its last step.
    pub fn progress(&self) -> Stats {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, stats: Stats) {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = stats;
    }
}

pub struct Generation {
    /// The sequence's state; handed to the prefix cache when the generation ends.
    model: Option<Phi3Model>,
    /// Where the state goes when the generation ends, if anywhere.
    prefix_cache: Option<Arc<PrefixCache>>,
    /// This stream's place in the engine's batched passes; given up when it ends.
    seat: Option<Seat>,
    sampler: Sampler,
    text: TextStream,
    stop: StopStrings,
    prompt: Vec<u32>,
    prefilled: usize,
    max_tokens: usize,
    stop_token_ids: Vec<u32>,
    generated: Vec<u32>,
    /// Top alternatives to report per token, when log-probabilities were asked for.
    top_logprobs: Option<usize>,
    logprobs: Vec<TokenLogprob>,
    /// Generated tokens already handed out with a piece of text.
    reported: usize,
    /// Logits for the next sample, once the prompt is in.
    logits: Option<Tensor>,
    /// The last sampled token, fed to the model at the start of the next step so that no
    /// forward pass is spent after the final token.
    unfed: Option<u32>,
    stats: Stats,
    started: Option<Instant>,
    first_token_at: Option<Instant>,
    done: bool,
    controls: Controls,
}

impl Generation {
    /// Checks the request against the model before any compute; with a prefix cache, the
    /// longest kept prefix of the prompt is reused.
    pub fn new(
        weights: Arc<Phi3Weights>,
        tokenizer: Arc<Phi3Tokenizer>,
        prompt: Vec<u32>,
        params: &GenerationParams,
        prefix_cache: Option<Arc<PrefixCache>>,
        batcher: &Arc<Batcher>,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(Error::invalid_argument(
                "prompt",
                "''",
                "It encodes to no tokens; pass some text",
            ));
        }
        let config = &weights.config;
        let vocab_size = config.vocab_size;
        check_ids("prompt", prompt.iter().copied(), vocab_size)?;
        check_ids(
            "stop_token_ids",
            params.stop_token_ids.iter().copied(),
            vocab_size,
        )?;
        let biased = params.sampling.logit_bias.iter().map(|&(id, _)| id);
        check_ids("logit_bias", biased, vocab_size)?;
        if let Some(top) = params.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(Error::invalid_argument(
                "top_logprobs",
                top,
                format!("It must be from 0 to {MAX_TOP_LOGPROBS}"),
            ));
        }
        let sampler = Sampler::new(&params.sampling)?;
        let stop = StopStrings::new(params.stop.clone())?;
        let context_length = config.context_length;
        let room = context_length.saturating_sub(prompt.len());
        let max_tokens = params.max_tokens.unwrap_or(room);
        if prompt.len() + max_tokens > context_length || prompt.len() > context_length {
            return Err(Error::ContextLength {
                prompt_tokens: prompt.len(),
                max_tokens,
                context_length,
            });
        }
        let span = prompt.len() + max_tokens;
        let reused = prefix_cache.as_ref().and_then(|c| c.take(&prompt, span));
        let (mut model, cached) = match reused {
            Some(reused) => (reused.model, reused.tokens),
            None => (Phi3Model::new(weights, span).map_err(Error::generation)?, 0),
        };
        let controls = Controls::default();
        model.set_interrupt(Arc::clone(&controls.interrupt));
        let mut stop_token_ids = if params.ignore_eos {
            Vec::new()
        } else {
            tokenizer.end_token_ids().to_vec()
        };
        stop_token_ids.extend(&params.stop_token_ids);
        let stats = Stats {
            prompt_tokens: prompt.len(),
            cached_tokens: cached,
            seed: sampler.seed(),
            ..Stats::default()
        };
        controls.publish(stats);
        Ok(Self {
            model: Some(model),
            prefix_cache,
            seat: Some(batcher.seat()),
            sampler,
            text: TextStream::new(tokenizer),
            stop,
            prompt,
            prefilled: cached,
            max_tokens,
            stop_token_ids,
            generated: Vec::new(),
            top_logprobs: params.logprobs,
            logprobs: Vec::new(),
            reported: 0,
            logits: None,
            unfed: None,
            stats,
            started: None,
            first_token_at: None,
            done: false,
            controls,
        })
    }

    /// The flags that interrupt or cancel this generation from another thread.
    pub fn controls(&self) -> Controls {
        self.controls.clone()
    }

    /// A failed forward pass: cancelled or interrupted on request, or a model failure.
    fn model_error(&self, err: candle_core::Error) -> Error {
        if self.controls.interrupt.load(Ordering::SeqCst) {
            Error::Interrupted
        } else {
            Error::generation(err)
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Records how many old chat messages were left out to fit the context.
    pub fn set_dropped_messages(&mut self, count: usize) {
        self.stats.dropped_messages = count;
        self.controls.publish(self.stats);
    }

    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt
    }

    /// The tokens generated so far (end tokens excluded).
    pub fn generated_ids(&self) -> &[u32] {
        &self.generated
    }

    /// Log-probabilities of the generated tokens, when asked for (else empty).
    pub fn logprobs(&self) -> &[TokenLogprob] {
        &self.logprobs
    }

    /// Whether log-probabilities were asked for.
    pub fn reports_logprobs(&self) -> bool {
        self.top_logprobs.is_some()
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn step(&mut self) -> Result<Step> {
        let step = self.step_unpublished();
        self.controls.publish(self.stats);
        step
    }

    fn step_unpublished(&mut self) -> Result<Step> {
        if self.done {
            return Ok(Step::Finished);
        }
        if self.controls.is_cancelled() {
            return self.flush(FinishReason::Cancelled);
        }
        if let Some(reason) = self.stats.finish_reason {
            return self.flush(reason);
        }
        match self.advance() {
            Err(Error::Interrupted) if self.controls.is_cancelled() => {
                self.flush(FinishReason::Cancelled)
            }
            other => other,
        }
    }

    fn advance(&mut self) -> Result<Step> {
        let started = *self.started.get_or_insert_with(Instant::now);
        if self.generated.len() >= self.max_tokens {
            return self.flush(FinishReason::Length);
        }
        if self.prefilled < self.prompt.len() {
            let end = (self.prefilled + PREFILL_CHUNK).min(self.prompt.len());
            let chunk_start = Instant::now();
            let chunk = self.prompt[self.prefilled..end].to_vec();
            // Only the last chunk's logits are sampled from.
            let output = if end == self.prompt.len() {
                Output::Last
            } else {
                Output::Nothing
            };
            self.logits = self.pass(chunk, output)?;
            self.stats.prompt_time += chunk_start.elapsed();
            self.prefilled = end;
            if end == self.prompt.len() && end > PREFILL_CHUNK {
                // Decoding needs only small buffers, while the cache grows: the prompt's
                // chunks' buffers go back to the system (measured: 6 MiB less peak RSS
                // after 4,000 tokens of Phi-3-mini's shapes, 8 layers).
                crate::heap::release_freed();
            }
            return Ok(Step::Working);
        }

        if let Some(token) = self.unfed {
            self.logits = self.pass(vec![token], Output::Last)?;
            self.unfed = None;
        }
        let Some(logits) = self.logits.take() else {
            return Err(Error::Generation {
                detail: "no logits to sample from".into(),
            });
        };
        let token = self.sampler.sample(&logits, &self.generated)?;
        let now = Instant::now();
        let first = *self.first_token_at.get_or_insert(now);
        self.stats.time_to_first_token = Some(first - started);
        self.stats.generation_time = now - first;
        self.stats.sampled_tokens += 1;
        if self.stop_token_ids.contains(&token) {
            return self.flush(FinishReason::Stop);
        }
        if let Some(top) = self.top_logprobs {
            let values = logits.to_vec1::<f32>().map_err(Error::generation)?;
            self.logprobs.push(token_logprob(&values, token, top));
        }
        self.generated.push(token);
        self.stats.generated_tokens = self.generated.len();
        self.unfed = Some(token);
        Ok(match self.text.push(token)? {
            Some(text) => self.release(text),
            None => Step::Working,
        })
    }

    /// Feeds `tokens` in the engine's next batched pass.
    fn pass(&mut self, tokens: Vec<u32>, output: Output) -> Result<Option<Tensor>> {
        let (Some(model), Some(seat)) = (self.model.take(), self.seat.as_ref()) else {
            return Err(Error::Generation {
                detail: "this stream's state was released".into(),
            });
        };
        let Done { model, result } = seat.step(model, tokens, output);
        self.model = Some(model);
        result.map_err(|e| self.model_error(e))
    }

    /// Hands out the generated tokens not yet reported, with `text`.
    fn piece(&mut self, text: String) -> Piece {
        let tokens = self.reported..self.generated.len();
        self.reported = self.generated.len();
        Piece { text, tokens }
    }

    /// Passes decoded text through the stop strings.
    fn release(&mut self, text: String) -> Step {
        match self.stop.push(text) {
            StopOutcome::Continue(text) if text.is_empty() => Step::Working,
            StopOutcome::Continue(text) => Step::Text(self.piece(text)),
            StopOutcome::Stopped(text) => {
                self.stats.finish_reason = Some(FinishReason::Stop);
                self.end();
                Step::Text(self.piece(text))
            }
        }
    }

    /// Ends the generation, releasing the text the decoder and the stop strings still hold.
    fn flush(&mut self, reason: FinishReason) -> Result<Step> {
        self.stats.finish_reason = Some(reason);
        self.end();
        let mut out = String::new();
        if let Some(rest) = self.text.finish()? {
            match self.stop.push(rest) {
                StopOutcome::Continue(text) => out.push_str(&text),
                StopOutcome::Stopped(text) => {
                    self.stats.finish_reason = Some(FinishReason::Stop);
                    out.push_str(&text);
                    self.stop = StopStrings::default();
                }
            }
        }
        out.push_str(&self.stop.finish());
        Ok(if out.is_empty() && self.reported == self.generated.len() {
            Step::Finished
        } else {
            Step::Text(self.piece(out))
        })
    }

    /// Marks the generation done and hands its state to the prefix cache.
    fn end(&mut self) {
        self.done = true;
        self.release_state();
    }

    /// Ends the generation now (`FinishReason::Cancelled` unless it had ended) and frees or
    /// hands on its state.
    pub fn close(&mut self) {
        if !self.done {
            self.stats
                .finish_reason
                .get_or_insert(FinishReason::Cancelled);
        }
        self.done = true;
        self.logits = None;
        self.release_state();
        self.controls.publish(self.stats);
    }

    /// The tokens the model's cache holds: the prompt as far as it was fed, then every
    /// generated token but one not fed yet.
    fn cached_tokens(&self) -> Vec<u32> {
        if self.prefilled < self.prompt.len() {
            return self.prompt[..self.prefilled].to_vec();
        }
        let fed = self.generated.len() - usize::from(self.unfed.is_some());
        let mut tokens = Vec::with_capacity(self.prompt.len() + fed);
        tokens.extend_from_slice(&self.prompt);
        tokens.extend_from_slice(&self.generated[..fed]);
        tokens
    }

    fn release_state(&mut self) {
        if let Some(model) = self.model.take() {
            if let Some(cache) = &self.prefix_cache {
                let tokens = self.cached_tokens();
                // `put` checks that the cache holds exactly these tokens.
                cache.put(tokens, model);
            }
        }
        // Last: leaving the batcher may hand freed memory back (`heap::release_freed`),
        // which should include what the lines above freed.
        self.seat = None;
    }
}

/// The first id of `ids` past the vocabulary, as the error naming `name`.
fn check_ids(name: &str, mut ids: impl Iterator<Item = u32>, vocab_size: usize) -> Result<()> {
    match ids.find(|&id| id as usize >= vocab_size) {
        Some(bad) => Err(Error::invalid_argument(
            name,
            bad,
            format!("Token ids must be below the vocabulary size {vocab_size}"),
        )),
        None => Ok(()),
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.release_state();
    }
}
