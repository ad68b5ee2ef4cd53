//! Sampling settings, checked once, and the sampler: penalties, bias and min-p on the
//! logits, then top-k, temperature, top-p and a seeded draw.

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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
    pub presence_penalty: f64,
    /// OpenAI's: subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f64,
    /// Added to the logits of these token ids; [`BAN_BIAS`] bans the token.
    pub logit_bias: Vec<(u32, f64)>,
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
}

pub struct Sampler {
    rng: StdRng,
    temperature: f64,
    top_k: Option<usize>,
    /// Below 1, or `None`.
    top_p: Option<f64>,
    /// ln(min_p): a token whose logit is further than this below the best one is dropped.
    min_log_p: Option<f32>,
    repeat_penalty: f32,
    repeat_last_n: usize,
    presence_penalty: f32,
    frequency_penalty: f32,
    logit_bias: Vec<(u32, f32)>,
    seed: u64,
    /// Candidate token ids, kept between tokens to spare a vocabulary-sized allocation.
    candidates: Vec<u32>,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(rand::random);
        Ok(Self {
            rng: StdRng::seed_from_u64(seed),
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p.filter(|&p| p < 1.0),
            min_log_p: (params.min_p > 0.0).then(|| params.min_p.ln() as f32),
            repeat_penalty: params.repeat_penalty,
            repeat_last_n: params.repeat_last_n,
            presence_penalty: params.presence_penalty as f32,
            frequency_penalty: params.frequency_penalty as f32,
            logit_bias: params
                .logit_bias
                .iter()
                .map(|&(id, bias)| (id, bias as f32))
                .collect(),
            seed,
            candidates: Vec::new(),
        })
    }

    /// The seed in use, drawn at random when none was given.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Picks the next token from `logits` (vocab,), given the tokens generated so far.
    ///
    /// Logits that differ in their last bits (the same prompt computed in other chunks, as
    /// prefix reuse does) give the same token for the same seed, short of a draw landing
    /// within that difference of a boundary.
    pub fn sample(&mut self, logits: &Tensor, generated: &[u32]) -> Result<u32> {
        let mut values = logits.to_vec1::<f32>().map_err(Error::generation)?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(Error::Generation {
                detail: "the model computed non-finite logits (NaN or infinity): the weights in the file are corrupt or were converted wrongly".into(),
            });
        }
        self.transform(&mut values, generated);
        let banned_all = || Error::Generation {
            detail:
                "no token is left to sample: logit_bias banned every token; lift some of the bans"
                    .into(),
        };
        if self.temperature == 0.0 {
            // The first of equal maxima: the lowest id.
            let best = values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .fold(None, |best: Option<(usize, f32)>, (i, &v)| match best {
                    Some((_, b)) if b >= v => best,
                    _ => Some((i, v)),
                });
            return best.map(|(i, _)| i as u32).ok_or_else(banned_all);
        }
        let candidates = &mut self.candidates;
        candidates.clear();
        candidates.extend((0..values.len() as u32).filter(|&i| values[i as usize].is_finite()));
        if candidates.is_empty() {
            return Err(banned_all());
        }
        // Most likely first, ties by lower id: a total order.
        let order = |a: &u32, b: &u32| {
            values[*b as usize]
                .total_cmp(&values[*a as usize])
                .then(a.cmp(b))
        };
        if let Some(k) = self.top_k.filter(|&k| k < candidates.len()) {
            candidates.select_nth_unstable_by(k - 1, order);
            candidates.truncate(k);
        }
        if self.top_p.is_some() {
            candidates.sort_unstable_by(order);
        }
        // Softmax at the temperature, over the candidates only.
        let best = candidates
            .iter()
            .map(|&i| values[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / self.temperature;
        let weights: Vec<f64> = candidates
            .iter()
            .map(|&i| (f64::from(values[i as usize] - best) * inv_t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        // Top-p: the most likely candidates until their mass reaches p (the one that
        // crosses it included).
        let mut kept = weights.len();
        if let Some(p) = self.top_p {
            let mut mass = 0.0;
            for (n, w) in weights.iter().enumerate() {
                if mass >= p * total {
                    kept = n;
                    break;
                }
                mass += w;
            }
        }
        // The draw walks the kept tokens in id order: last-bit differences then move its
        // boundaries by as little, where an order by probability would swap near-equal
        // tokens.
        let mut kept: Vec<(u32, f64)> = candidates[..kept]
            .iter()
            .copied()
            .zip(weights[..kept].iter().copied())
            .collect();
        kept.sort_unstable_by_key(|&(id, _)| id);
        let kept_total: f64 = kept.iter().map(|&(_, w)| w).sum();
        let mut draw = self.rng.random::<f64>() * kept_total;
        for &(id, w) in &kept {
            if draw < w {
                return Ok(id);
            }
            draw -= w;
        }
        // Rounding left the draw past the end: the last token.
        Ok(kept[kept.len() - 1].0)
    }

    /// Penalties, biases and min-p on the logits, in that order.
    fn transform(&self, values: &mut [f32], generated: &[u32]) {
        let recent = &generated[generated.len().saturating_sub(self.repeat_last_n)..];
        if self.repeat_penalty != 1.0 {
            apply_repeat_penalty(values, self.repeat_penalty, recent);
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            self.apply_openai_penalties(values, generated);
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
            apply_min_p(values, min_log_p);
        }
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

/// llama.cpp's repeat penalty, once per distinct recent token.
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
