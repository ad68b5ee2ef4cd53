//! Sampling settings, checked once, and the sampler: our logit transforms (penalties, bias,
//! min-p) in front of Candle's `LogitsProcessor` (temperature, top-k, top-p, the draw).

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::error::{Error, Result};

/// A `logit_bias` at or below this bans the token outright (OpenAI: "-100 should result in
/// a ban"), instead of only making it unlikely.
pub const BAN_BIAS: f32 = -100.0;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling mass in (0, 1]; `None` or 1 keeps every token.
    pub top_p: Option<f64>,
    /// Keep only the `k` most likely tokens; `None` keeps every token.
    pub top_k: Option<usize>,
    /// Drop tokens less likely than `min_p` times the most likely one (llama.cpp's
    /// semantics: measured before temperature); 0 is off.
    pub min_p: f64,
    /// `None` draws a fresh seed.
    pub seed: Option<u64>,
    /// Divides positive (multiplies negative) logits of recently generated tokens; 1 is off.
    pub repeat_penalty: f32,
    /// How many of the last generated tokens the penalty looks at; 0 is off.
    pub repeat_last_n: usize,
    /// OpenAI's: subtracted once from the logit of every token generated so far.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Added to the logits of these token ids; [`BAN_BIAS`] bans the token.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_p: Some(0.95),
            top_k: Some(40),
            min_p: 0.0,
            seed: None,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
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
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::invalid_argument(
                "min_p",
                self.min_p,
                "It must be in [0, 1] (0 turns it off)",
            ));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(Error::invalid_argument(
                "repeat_penalty",
                self.repeat_penalty,
                "It must be a finite number > 0 (1 means no penalty)",
            ));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(Error::invalid_argument(
                    name,
                    value,
                    "It must be a number from -2 to 2, as in OpenAI's API (0 turns it off)",
                ));
            }
        }
        for &(id, bias) in &self.logit_bias {
            if !(-100.0..=100.0).contains(&bias) {
                return Err(Error::invalid_argument(
                    format!("logit_bias[{id}]"),
                    bias,
                    "Biases must be numbers from -100 to 100 (-100 bans the token)",
                ));
            }
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
    presence_penalty: f32,
    frequency_penalty: f32,
    logit_bias: Vec<(u32, f32)>,
    /// ln(min_p): a token whose logit is further than this below the best one is dropped.
    min_log_p: Option<f32>,
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
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            logit_bias: params.logit_bias.clone(),
            min_log_p: (params.min_p > 0.0).then(|| params.min_p.ln() as f32),
            seed,
        })
    }

    /// The seed in use, drawn at random when none was given.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Picks the next token from `logits` (vocab,), given the tokens generated so far.
    pub fn sample(&mut self, logits: &Tensor, generated: &[u32]) -> candle_core::Result<u32> {
        let recent = &generated[generated.len().saturating_sub(self.repeat_last_n)..];
        let repeat = self.repeat_penalty != 1.0 && !recent.is_empty();
        let openai = (self.presence_penalty != 0.0 || self.frequency_penalty != 0.0)
            && !generated.is_empty();
        let sampled = if repeat || openai || !self.logit_bias.is_empty() || self.min_log_p.is_some()
        {
            logits.to_vec1::<f32>().and_then(|mut values| {
                if repeat {
                    apply_repeat_penalty(&mut values, self.repeat_penalty, recent);
                }
                if openai {
                    self.apply_openai_penalties(&mut values, generated);
                }
                for &(id, bias) in &self.logit_bias {
                    if let Some(logit) = values.get_mut(id as usize) {
                        *logit = if bias <= BAN_BIAS {
                            f32::NEG_INFINITY
                        } else {
                            *logit + bias
                        };
                    }
                }
                if let Some(min_log_p) = self.min_log_p {
                    apply_min_p(&mut values, min_log_p);
                }
                let n = values.len();
                self.processor
                    .sample(&Tensor::from_vec(values, n, logits.device())?)
            })
        } else {
            self.processor.sample(logits)
        };
        // Checked only when sampling failed, so the per-token path pays nothing: NaN or
        // infinite logits are what makes Candle's sampler fail, with a message about
        // "weights" that would point at the wrong thing.
        sampled.map_err(|err| match logits.sum_all().and_then(|s| s.to_scalar::<f32>()) {
            Ok(sum) if !sum.is_finite() => candle_core::Error::msg(
                "the model computed non-finite logits (NaN or infinity): the weights in the file are corrupt or were converted wrongly",
            ),
            Ok(_) if !self.logit_bias.is_empty() => candle_core::Error::msg(format!(
                "{err}; logit_bias may have banned every token the other settings allow"
            )),
            _ => err,
        })
    }

    fn apply_openai_penalties(&self, logits: &mut [f32], generated: &[u32]) {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &id in generated {
            *counts.entry(id).or_default() += 1;
        }
        for (id, count) in counts {
            if let Some(logit) = logits.get_mut(id as usize) {
                *logit -= self.presence_penalty + self.frequency_penalty * count as f32;
            }
        }
    }
}

/// llama.cpp's (and Candle's) repeat penalty, once per distinct recent token.
fn apply_repeat_penalty(logits: &mut [f32], penalty: f32, recent: &[u32]) {
    let mut seen = std::collections::HashSet::new();
    for &id in recent {
        if !seen.insert(id) {
            continue;
        }
        if let Some(logit) = logits.get_mut(id as usize) {
            if *logit >= 0.0 {
                *logit /= penalty;
            } else {
                *logit *= penalty;
            }
        }
    }
}

/// p_i / p_max = exp(l_i - l_max), so min-p needs no softmax: drop logits further than
/// ln(min_p) below the best.
fn apply_min_p(logits: &mut [f32], min_log_p: f32) {
    let best = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !best.is_finite() {
        return;
    }
    for logit in logits.iter_mut() {
        if *logit - best < min_log_p {
            *logit = f32::NEG_INFINITY;
        }
    }
}
