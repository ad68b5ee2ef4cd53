//! The generation loop as a resumable state machine: each `step` does one bounded piece of
//! work (a prompt chunk or one token), so the caller can check for Ctrl-C between pieces and
//! hand text out as soon as it exists.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::{Phi3Model, Phi3Weights};
use crate::sampling::{Sampler, SamplingParams};
use crate::stop::{StopOutcome, StopStrings};
use crate::tokenizer::{Phi3Tokenizer, TextStream};

/// Prompt tokens per forward pass: small enough that Ctrl-C between chunks lands quickly.
/// Measured on Phi-3-mini shapes, 2 threads: 34, 37 and 34 prompt tokens/s with chunks of
/// 64, 128 and 512, so larger chunks buy no speed with Candle's kernels.
pub const PREFILL_CHUNK: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// At most this many tokens are generated; `None` fills the rest of the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Extra token ids that end generation, besides the model's end tokens.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; the text ends just before the first one.
    pub stop: Vec<String>,
    /// Keep going past the model's end tokens (benchmarks); caller stop tokens still apply.
    pub ignore_eos: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: Some(256),
            sampling: SamplingParams::default(),
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end token, a stop token or a stop string was generated.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What one `step` produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Work was done but no text is ready yet (a prompt chunk, or a token whose text is
    /// still incomplete).
    Working,
    Text(String),
    Finished,
}

/// Counts and timings of one generation, readable at any moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub finish_reason: Option<FinishReason>,
    pub seed: u64,
    /// Time spent feeding the prompt.
    pub prompt_time: Duration,
    /// From the first step to the first generated token.
    pub time_to_first_token: Option<Duration>,
    /// From the first sampled token to the last one.
    pub generation_time: Duration,
    /// Tokens sampled, an end or stop token included (each cost a forward pass).
    pub sampled_tokens: usize,
}

impl Stats {
    /// Prompt tokens per second of prompt processing.
    pub fn prompt_tokens_per_second(&self) -> Option<f64> {
        let secs = self.prompt_time.as_secs_f64();
        (secs > 0.0).then(|| self.prompt_tokens as f64 / secs)
    }

    /// Tokens per second after the first one (which comes from the prompt's forward pass).
    pub fn generation_tokens_per_second(&self) -> Option<f64> {
        let secs = self.generation_time.as_secs_f64();
        (self.sampled_tokens > 1 && secs > 0.0).then(|| (self.sampled_tokens - 1) as f64 / secs)
    }
}

pub struct Generation {
    model: Phi3Model,
    sampler: Sampler,
    text: TextStream,
    stop: StopStrings,
    prompt: Vec<u32>,
    prefilled: usize,
    max_tokens: usize,
    stop_token_ids: Vec<u32>,
    generated: Vec<u32>,
    /// Logits for the next sample, once the prompt is in.
    logits: Option<Tensor>,
    /// The last sampled token, fed to the model at the start of the next step so that no
    /// forward pass is spent after the final token.
    unfed: Option<u32>,
    stats: Stats,
    started: Option<Instant>,
    first_token_at: Option<Instant>,
    done: bool,
    /// Set from another thread to stop the step in progress (Ctrl-C); the step then fails
    /// with `Error::Interrupted` and the generation can go on where it was.
    interrupt: Arc<AtomicBool>,
}

impl Generation {
    /// Checks the request against the model before any compute.
    pub fn new(
        weights: Arc<Phi3Weights>,
        tokenizer: Arc<Phi3Tokenizer>,
        prompt: Vec<u32>,
        params: &GenerationParams,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(Error::invalid_argument(
                "prompt",
                "''",
                "It encodes to no tokens; pass some text",
            ));
        }
        let config = &weights.config;
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= config.vocab_size) {
            return Err(Error::invalid_argument(
                "prompt",
                bad,
                format!(
                    "Token ids must be below the vocabulary size {}",
                    config.vocab_size
                ),
            ));
        }
        if let Some(&bad) = params
            .stop_token_ids
            .iter()
            .find(|&&id| id as usize >= config.vocab_size)
        {
            return Err(Error::invalid_argument(
                "stop_token_ids",
                bad,
                format!(
                    "Token ids must be below the vocabulary size {}",
                    config.vocab_size
                ),
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
        let mut model =
            Phi3Model::new(weights, prompt.len() + max_tokens).map_err(Error::generation)?;
        let interrupt = Arc::new(AtomicBool::new(false));
        model.set_interrupt(Arc::clone(&interrupt));
        let mut stop_token_ids = if params.ignore_eos {
            Vec::new()
        } else {
            tokenizer.end_token_ids().to_vec()
        };
        stop_token_ids.extend(&params.stop_token_ids);
        let stats = Stats {
            prompt_tokens: prompt.len(),
            seed: sampler.seed(),
            ..Stats::default()
        };
        Ok(Self {
            model,
            sampler,
            text: TextStream::new(tokenizer),
            stop,
            prompt,
            prefilled: 0,
            max_tokens,
            stop_token_ids,
            generated: Vec::new(),
            logits: None,
            unfed: None,
            stats,
            started: None,
            first_token_at: None,
            done: false,
            interrupt,
        })
    }

    /// The flag that interrupts the step in progress when set.
    pub fn interrupt_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.interrupt)
    }

    /// A failed forward pass: interrupted on request, or a model failure.
    fn model_error(&self, err: candle_core::Error) -> Error {
        if self.interrupt.load(Ordering::Relaxed) {
            Error::Interrupted
        } else {
            Error::generation(err)
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt
    }

    /// The tokens generated so far (end tokens excluded).
    pub fn generated_ids(&self) -> &[u32] {
        &self.generated
    }

    pub fn step(&mut self) -> Result<Step> {
        if self.done {
            return Ok(Step::Finished);
        }
        if let Some(reason) = self.stats.finish_reason {
            return self.flush(reason);
        }
        let started = *self.started.get_or_insert_with(Instant::now);
        if self.generated.len() >= self.max_tokens {
            return self.flush(FinishReason::Length);
        }
        if self.prefilled < self.prompt.len() {
            let end = (self.prefilled + PREFILL_CHUNK).min(self.prompt.len());
            let chunk_start = Instant::now();
            let chunk = &self.prompt[self.prefilled..end];
            // Only the last chunk's logits are sampled from.
            let fed = if end == self.prompt.len() {
                self.model.forward(chunk).map(Some)
            } else {
                self.model.feed(chunk).map(|()| None)
            };
            self.logits = fed.map_err(|e| self.model_error(e))?;
            self.stats.prompt_time += chunk_start.elapsed();
            self.prefilled = end;
            return Ok(Step::Working);
        }

        if let Some(token) = self.unfed {
            let logits = self.model.forward(&[token]);
            self.logits = Some(logits.map_err(|e| self.model_error(e))?);
            self.unfed = None;
        }
        let Some(logits) = self.logits.take() else {
            return Err(Error::Generation {
                detail: "no logits to sample from".into(),
            });
        };
        let token = self
            .sampler
            .sample(&logits, &self.generated)
            .map_err(Error::generation)?;
        let now = Instant::now();
        let first = *self.first_token_at.get_or_insert(now);
        self.stats.time_to_first_token = Some(first - started);
        self.stats.generation_time = now - first;
        self.stats.sampled_tokens += 1;
        if self.stop_token_ids.contains(&token) {
            return self.flush(FinishReason::Stop);
        }
        self.generated.push(token);
        self.stats.generated_tokens = self.generated.len();
        self.unfed = Some(token);
        Ok(match self.text.push(token)? {
            Some(text) => self.release(text),
            None => Step::Working,
        })
    }

    /// Passes decoded text through the stop strings.
    fn release(&mut self, text: String) -> Step {
        match self.stop.push(text) {
            StopOutcome::Continue(text) if text.is_empty() => Step::Working,
            StopOutcome::Continue(text) => Step::Text(text),
            StopOutcome::Stopped(text) => {
                self.stats.finish_reason = Some(FinishReason::Stop);
                self.done = true;
                if text.is_empty() {
                    Step::Finished
                } else {
                    Step::Text(text)
                }
            }
        }
    }

    /// Ends the generation, releasing the text the decoder and the stop strings still hold.
    fn flush(&mut self, reason: FinishReason) -> Result<Step> {
        self.stats.finish_reason = Some(reason);
        self.done = true;
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
        Ok(if out.is_empty() {
            Step::Finished
        } else {
            Step::Text(out)
        })
    }
}
