//! Sampling settings, checked once, over Candle's `LogitsProcessor` and repeat penalty.

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; `None` or 1 keeps every token.
    pub top_p: Option<f64>,
    /// Keep only the `k` most likely tokens; `None` keeps every token.
    pub top_k: Option<usize>,
    /// `None` draws a fresh seed.
    pub seed: Option<u64>,
    /// Divides positive (multiplies negative) logits of recently generated tokens; 1 is off.
    pub repeat_penalty: f32,
    /// How many of the last generated tokens the penalty looks at; 0 is off.
    pub repeat_last_n: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_p: Some(0.95),
            top_k: Some(40),
            seed: None,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid_argument(
                "temperature",
                self.temperature,
                "It must be a finite number >= 0 (0 means greedy decoding)",
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid_argument(
                    "top_p",
                    p,
                    "It must be in (0, 1]; use 1 or None to keep every token",
                ));
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid_argument(
                "top_k",
                0,
                "It must be at least 1; use None to keep every token",
            ));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(Error::invalid_argument(
                "repeat_penalty",
                self.repeat_penalty,
                "It must be a finite number > 0 (1 means no penalty)",
            ));
        }
        Ok(())
    }

    fn sampling(&self) -> Sampling {
        let temperature = self.temperature;
        if temperature == 0.0 {
            return Sampling::ArgMax;
        }
        let top_p = self.top_p.filter(|&p| p < 1.0);
        match (self.top_k, top_p) {
            (None, None) => Sampling::All { temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        }
    }
}

pub struct Sampler {
    processor: LogitsProcessor,
    repeat_penalty: f32,
    repeat_last_n: usize,
    seed: u64,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(rand::random);
        Ok(Self {
            processor: LogitsProcessor::from_sampling(seed, params.sampling()),
            repeat_penalty: params.repeat_penalty,
            repeat_last_n: params.repeat_last_n,
            seed,
        })
    }

    /// The seed in use, drawn at random when none was given.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Picks the next token from `logits` (vocab,), penalising the tail of `generated`.
    pub fn sample(&mut self, logits: &Tensor, generated: &[u32]) -> candle_core::Result<u32> {
        let recent = &generated[generated.len().saturating_sub(self.repeat_last_n)..];
        let sampled = if self.repeat_penalty == 1.0 || recent.is_empty() {
            self.processor.sample(logits)
        } else {
            candle_transformers::utils::apply_repeat_penalty(logits, self.repeat_penalty, recent)
                .and_then(|penalised| self.processor.sample(&penalised))
        };
        // Checked only when sampling failed, so the per-token path pays nothing: NaN or
        // infinite logits are what makes Candle's sampler fail, with a message about
        // "weights" that would point at the wrong thing.
        sampled.map_err(|err| match logits.sum_all().and_then(|s| s.to_scalar::<f32>()) {
            Ok(sum) if !sum.is_finite() => candle_core::Error::msg(
                "the model computed non-finite logits (NaN or infinity): the weights in the file are corrupt or were converted wrongly",
            ),
            _ => err,
        })
    }
}
