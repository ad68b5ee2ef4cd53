//! The keyword options `generate` and `chat` share: their one definition (names, defaults
//! and conversion), read from the `**options` both methods pass on.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyMapping};

use super::args::{
    extract, frequency_penalty, ignore_eos, items, logprobs, max_tokens, min_p, non_negative,
    presence_penalty, repeat_last_n, repeat_penalty, repr, seed, stop, stop_token_ids, temperature,
    top_k, top_logprobs, top_p, wrong_type,
};
use super::errors::to_py_err;
use crate::error::Error;
use crate::generation::GenerationParams;
use crate::sampling::SamplingParams;

/// The options as Python passed them, defaults filled in.
pub(crate) struct GenerationOptions {
    max_tokens: Option<i64>,
    temperature: f64,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: f64,
    seed: Option<i64>,
    repeat_penalty: f64,
    repeat_last_n: i64,
    presence_penalty: f64,
    frequency_penalty: f64,
    logit_bias: Vec<(u32, f64)>,
    stop: Option<Vec<String>>,
    stop_token_ids: Option<Vec<u32>>,
    ignore_eos: bool,
    logprobs: bool,
    top_logprobs: Option<i64>,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        let sampling = SamplingParams::default();
        Self {
            max_tokens: Some(256),
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            top_k: sampling.top_k.map(|k| k as i64),
            min_p: sampling.min_p,
            seed: None,
            repeat_penalty: f64::from(sampling.repeat_penalty),
            repeat_last_n: sampling.repeat_last_n as i64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            stop: None,
            stop_token_ids: None,
            ignore_eos: false,
            logprobs: false,
            top_logprobs: None,
        }
    }
}

/// `logit_bias`: a mapping of token id to a float from -100 to 100.
fn logit_bias(obj: &Bound<'_, PyAny>) -> PyResult<Vec<(u32, f64)>> {
    let expected = "a dict of token id (int) to bias (float), or None";
    if obj.is_none() {
        return Ok(Vec::new());
    }
    let Ok(mapping) = obj.cast::<PyMapping>() else {
        return Err(wrong_type(obj, "logit_bias", expected));
    };
    let keys = items(&mapping.keys()?.into_any(), "logit_bias", expected)?;
    keys.iter()
        .map(|key| {
            let out_of_range = || {
                to_py_err(
                    obj.py(),
                    Error::invalid_argument(
                        "logit_bias",
                        format!("a key {}", repr(key)),
                        "Token ids are ints from 0 to 2**32 - 1",
                    ),
                )
            };
            if key.is_instance_of::<pyo3::types::PyInt>() && key.extract::<i64>().is_err() {
                return Err(out_of_range());
            }
            let id: i64 = extract(key, "logit_bias", "a dict whose keys are token ids (ints)")?;
            let name = format!("logit_bias[{id}]");
            let id = u32::try_from(id).map_err(|_| out_of_range())?;
            let bias: f64 = extract(&mapping.get_item(key)?, &name, "a float from -100 to 100")?;
            Ok((id, bias))
        })
        .collect()
}

impl GenerationOptions {
    /// Reads the keyword arguments of `method`; an unknown name is a TypeError, as Python
    /// raises for any function.
    pub(crate) fn from_kwargs(method: &str, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut options = Self::default();
        let Some(kwargs) = kwargs else {
            return Ok(options);
        };
        for (key, value) in kwargs.iter() {
            let name: String = key.extract()?;
            let value = &value;
            match name.as_str() {
                "max_tokens" => options.max_tokens = max_tokens(value)?,
                "temperature" => options.temperature = temperature(value)?,
                "top_p" => options.top_p = top_p(value)?,
                "top_k" => options.top_k = top_k(value)?,
                "min_p" => options.min_p = min_p(value)?,
                "seed" => options.seed = seed(value)?,
                "repeat_penalty" => options.repeat_penalty = repeat_penalty(value)?,
                "repeat_last_n" => options.repeat_last_n = repeat_last_n(value)?,
                "presence_penalty" => options.presence_penalty = presence_penalty(value)?,
                "frequency_penalty" => options.frequency_penalty = frequency_penalty(value)?,
                "logit_bias" => options.logit_bias = logit_bias(value)?,
                "stop" => options.stop = stop(value)?,
                "stop_token_ids" => options.stop_token_ids = stop_token_ids(value)?,
                "ignore_eos" => options.ignore_eos = ignore_eos(value)?,
                "logprobs" => options.logprobs = logprobs(value)?,
                "top_logprobs" => options.top_logprobs = top_logprobs(value)?,
                _ => {
                    return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                        "{method}() got an unexpected keyword argument '{name}'"
                    )))
                }
            }
        }
        Ok(options)
    }

    /// Range checks that need the Python integers; the engine checks the rest.
    pub(crate) fn into_params(self, py: Python<'_>) -> PyResult<GenerationParams> {
        let max_tokens = self
            .max_tokens
            .map(|n| {
                non_negative(
                    py,
                    n,
                    "max_tokens",
                    "It must be >= 0, or None to fill the context",
                )
            })
            .transpose()?;
        let top_k = self
            .top_k
            .map(|k| {
                non_negative(
                    py,
                    k,
                    "top_k",
                    "It must be at least 1, or None to keep every token",
                )
            })
            .transpose()?;
        let seed = self
            .seed
            .map(|s| {
                u64::try_from(s).map_err(|_| {
                    to_py_err(
                        py,
                        Error::invalid_argument(
                            "seed",
                            s,
                            "It must be an int >= 0, or None for a random seed",
                        ),
                    )
                })
            })
            .transpose()?;
        let repeat_last_n = non_negative(
            py,
            self.repeat_last_n,
            "repeat_last_n",
            "It must be >= 0 (0 turns the penalty off)",
        )?;
        let top_logprobs = self
            .top_logprobs
            .map(|k| non_negative(py, k, "top_logprobs", "It must be from 0 to 20, or None"))
            .transpose()?;
        let logprobs = match (self.logprobs, top_logprobs) {
            (true, top) => Some(top.unwrap_or(0)),
            (false, None | Some(0)) => None,
            (false, Some(k)) => {
                return Err(to_py_err(
                    py,
                    Error::invalid_argument(
                        "top_logprobs",
                        k,
                        "It needs logprobs=True (as in OpenAI's API)",
                    ),
                ))
            }
        };
        Ok(GenerationParams {
            max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k,
                min_p: self.min_p,
                seed,
                repeat_penalty: self.repeat_penalty as f32,
                repeat_last_n,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                logit_bias: self.logit_bias,
            },
            stop_token_ids: self.stop_token_ids.unwrap_or_default(),
            stop: self.stop.unwrap_or_default(),
            ignore_eos: self.ignore_eos,
            logprobs,
        })
    }
}
