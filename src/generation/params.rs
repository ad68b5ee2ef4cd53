//! What a generation is asked for, how it ended, and what it measured.

use std::time::Duration;

use crate::sampling::SamplingParams;

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
    /// Report each generated token's log-probability with this many alternatives (at most
    /// [`crate::logprobs::MAX_TOP_LOGPROBS`]); `None` reports nothing and costs nothing.
    pub logprobs: Option<usize>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: Some(256),
            sampling: SamplingParams::default(),
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end token, a stop token or a stop string was generated.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The stream was cancelled (or closed) before it ended.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Counts and timings of one generation, readable at any moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub prompt_tokens: usize,
    /// Prompt tokens whose state came from an earlier stream (not computed again).
    pub cached_tokens: usize,
    /// Oldest chat messages left out so that the conversation fits the context.
    pub dropped_messages: usize,
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
    /// Prompt tokens computed per second (reused ones are not counted).
    pub fn prompt_tokens_per_second(&self) -> Option<f64> {
        let secs = self.prompt_time.as_secs_f64();
        (secs > 0.0).then(|| (self.prompt_tokens - self.cached_tokens) as f64 / secs)
    }

    /// Tokens per second after the first one (which comes from the prompt's forward pass).
    pub fn generation_tokens_per_second(&self) -> Option<f64> {
        let secs = self.generation_time.as_secs_f64();
        (self.sampled_tokens > 1 && secs > 0.0).then(|| (self.sampled_tokens - 1) as f64 / secs)
    }
}
