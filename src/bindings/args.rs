//! Conversion of Python arguments, so that a wrong type raises `InvalidArgumentError` naming
//! the parameter and the value, like every other bad argument.

use pyo3::conversion::FromPyObjectOwned;
use pyo3::prelude::*;

use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMapping, PySequence, PyString};

use super::errors::to_py_err;
use crate::chat::{ChatMessage, Role};
use crate::error::Error;
use crate::generation::GenerationParams;
use crate::sampling::SamplingParams;

pub(crate) fn extract<'py, T: FromPyObjectOwned<'py>>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    expected: &str,
) -> PyResult<T> {
    // bool is an int subclass in Python; True as a token count is a mistake, not a 1.
    let wrong_bool = obj.is_instance_of::<pyo3::types::PyBool>() && !expected.contains("bool");
    match obj.extract::<T>() {
        Ok(value) if !wrong_bool => Ok(value),
        Ok(_) => Err(wrong_type(obj, name, expected)),
        Err(e) => {
            let e: PyErr = e.into();
            // Ctrl-C or a failed allocation inside a user's `__index__` is not a wrong type.
            if is_not_about_the_value(obj.py(), &e) {
                Err(e)
            } else {
                Err(wrong_type(obj, name, expected))
            }
        }
    }
}

/// KeyboardInterrupt, SystemExit (not `Exception`s) and MemoryError pass through.
fn is_not_about_the_value(py: Python<'_>, err: &PyErr) -> bool {
    !err.is_instance_of::<pyo3::exceptions::PyException>(py)
        || err.is_instance_of::<pyo3::exceptions::PyMemoryError>(py)
}

/// The `InvalidArgumentError` for a value of the wrong type.
fn wrong_type(obj: &Bound<'_, PyAny>, name: &str, expected: &str) -> PyErr {
    let type_name = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default();
    to_py_err(
        obj.py(),
        Error::invalid_argument(
            name,
            format!("{} (of type {type_name})", repr(obj)),
            format!("It must be {expected}"),
        ),
    )
}

/// One `from_py_with` converter per parameter, each naming its parameter in errors.
macro_rules! converters {
    ($($fn_name:ident: $ty:ty = $param:literal, $expected:literal;)*) => {$(
        pub(crate) fn $fn_name(obj: &Bound<'_, PyAny>) -> PyResult<$ty> {
            extract(obj, $param, $expected)
        }
    )*};
}

converters! {
    max_tokens: Option<i64> = "max_tokens", "an int >= 0 or None";
    temperature: f64 = "temperature", "a float >= 0";
    top_p: Option<f64> = "top_p", "a float in (0, 1] or None";
    top_k: Option<i64> = "top_k", "an int >= 1 or None";
    seed: Option<i64> = "seed", "an int >= 0 or None";
    repeat_penalty: f64 = "repeat_penalty", "a float > 0";
    repeat_last_n: i64 = "repeat_last_n", "an int >= 0";

    skip_special_tokens: bool = "skip_special_tokens", "a bool";
    add_special_tokens: bool = "add_special_tokens", "a bool";
    add_generation_prompt: bool = "add_generation_prompt", "a bool";
    chunk_size: Option<i64> = "chunk_size", "an int >= 1 or None";
    model: Option<std::path::PathBuf> = "model", "a path (str or os.PathLike) or None";
    tokenizer: Option<std::path::PathBuf> = "tokenizer", "a path (str or os.PathLike) or None";
    progress: bool = "progress", "a bool";
    n_threads: Option<i64> = "n_threads", "an int >= 1 or None";
    ignore_eos: bool = "ignore_eos", "a bool";
}

/// One `from_py_with` converter per str parameter: a str that is not valid text (a lone
/// surrogate) is an `InvalidArgumentError` naming the parameter, not a UnicodeEncodeError.
macro_rules! text_converters {
    ($($fn_name:ident = $param:literal;)*) => {$(
        pub(crate) fn $fn_name(obj: &Bound<'_, PyAny>) -> PyResult<String> {
            str_arg(obj, $param)
        }
    )*};
}

text_converters! {
    text = "text";
    token = "token";
    repo_id = "repo_id";
    filename = "filename";
    revision = "revision";
    tokenizer_revision = "tokenizer_revision";
}

pub(crate) fn tokenizer_repo_id(obj: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
    if obj.is_none() {
        return Ok(None);
    }
    str_arg(obj, "tokenizer_repo_id").map(Some)
}

/// A str argument as Rust text.
pub(crate) fn str_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<String> {
    let py = obj.py();
    let Ok(string) = obj.cast::<PyString>() else {
        return Err(wrong_type(obj, name, "a str"));
    };
    match string.to_str() {
        Ok(text) => Ok(text.to_string()),
        Err(_) => Err(to_py_err(
            py,
            Error::invalid_argument(
                name,
                repr(obj),
                "It contains a lone surrogate (a code point from U+D800 to U+DFFF), which is not text; remove it, or decode the bytes it came from with errors='replace'",
            ),
        )),
    }
}

/// A non-negative integer as `usize`, or the named `InvalidArgumentError`.
pub(crate) fn non_negative(
    py: Python<'_>,
    value: i64,
    name: &'static str,
    expected: &str,
) -> PyResult<usize> {
    usize::try_from(value)
        .map_err(|_| to_py_err(py, Error::invalid_argument(name, value, expected)))
}

/// Most items a list argument may have: token ids, stop strings, messages. Far beyond any
/// context; the point is that a sequence claiming 10**18 items is refused, not reserved.
const MAX_ITEMS: usize = 1 << 24;

/// The items of a sequence argument. Its length is checked before anything is reserved for
/// it (a `__len__` can claim anything), and the count again while iterating.
fn items<'py>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    expected: &str,
) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let py = obj.py();
    let too_many = |n: String| {
        to_py_err(
            py,
            Error::invalid_argument(
                name,
                format!("a sequence of {n} items"),
                format!("It may have at most {MAX_ITEMS} items"),
            ),
        )
    };
    let is_sequence = obj.cast::<PySequence>().is_ok() && !obj.is_instance_of::<PyString>();
    if !is_sequence || obj.is_instance_of::<PyBytes>() || obj.is_instance_of::<PyByteArray>() {
        return Err(wrong_type(obj, name, expected));
    }
    match obj.len() {
        Ok(n) if n > MAX_ITEMS => return Err(too_many(n.to_string())),
        Ok(_) => {}
        Err(_) => return Err(too_many("unknown".into())),
    }
    let mut out = Vec::new();
    for item in obj.try_iter()? {
        if out.len() == MAX_ITEMS {
            return Err(too_many(format!("more than {MAX_ITEMS}")));
        }
        out.push(item?);
    }
    Ok(out)
}

/// Token ids: ints from 0 to 2**32 - 1.
pub(crate) fn id_list(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Vec<u32>> {
    let py = obj.py();
    items(obj, name, "a list of token ids (ints)")?
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let item_name = format!("{name}[{i}]");
            let id: i64 = extract(item, &item_name, "an int token id")?;
            u32::try_from(id).map_err(|_| {
                to_py_err(
                    py,
                    Error::invalid_argument(
                        item_name,
                        id,
                        "Token ids are ints from 0 to 2**32 - 1",
                    ),
                )
            })
        })
        .collect()
}

pub(crate) fn token_ids(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    id_list(obj, "token_ids")
}

pub(crate) fn stop_token_ids(obj: &Bound<'_, PyAny>) -> PyResult<Option<Vec<u32>>> {
    if obj.is_none() {
        return Ok(None);
    }
    id_list(obj, "stop_token_ids").map(Some)
}

/// `stop`: None, one string, or a sequence of strings.
pub(crate) fn stop(obj: &Bound<'_, PyAny>) -> PyResult<Option<Vec<String>>> {
    if obj.is_none() {
        return Ok(None);
    }
    if obj.is_instance_of::<PyString>() {
        return str_arg(obj, "stop").map(|one| Some(vec![one]));
    }
    items(obj, "stop", "a str, a list of str, or None")?
        .iter()
        .enumerate()
        .map(|(i, item)| str_arg(item, &format!("stop[{i}]")))
        .collect::<PyResult<Vec<_>>>()
        .map(Some)
}

/// `messages`: a sequence of mappings with a known `role` and a str `content`.
pub(crate) fn messages(obj: &Bound<'_, PyAny>) -> PyResult<Vec<ChatMessage>> {
    let py = obj.py();
    let bad = |name: String, value: String, expected: String| {
        to_py_err(py, Error::invalid_argument(name, value, expected))
    };
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyMapping>() {
        return Err(bad(
            "messages".into(),
            repr(obj),
            "It must be a list of {'role': ..., 'content': ...} dicts".into(),
        ));
    }
    items(obj, "messages", "a list of message dicts")?
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |key: &str| -> PyResult<String> {
                let value = item.get_item(key).map_err(|_| {
                    bad(
                        format!("messages[{i}]"),
                        repr(item),
                        format!("messages[{i}] needs a '{key}' key"),
                    )
                })?;
                str_arg(&value, &format!("messages[{i}]['{key}']"))
            };
            if !item.is_instance_of::<PyMapping>() {
                return Err(bad(
                    format!("messages[{i}]"),
                    repr(item),
                    format!("messages[{i}] must be a dict with 'role' and 'content'"),
                ));
            }
            let role = field("role")?;
            let role = Role::parse(&role).ok_or_else(|| {
                bad(
                    format!("messages[{i}]['role']"),
                    format!("'{role}'"),
                    "It must be 'system', 'user' or 'assistant'".into(),
                )
            })?;
            Ok(ChatMessage {
                role,
                content: field("content")?,
            })
        })
        .collect()
}

/// A value for an error message: its repr, shortened (a prompt can be megabytes).
fn repr(obj: &Bound<'_, PyAny>) -> String {
    const MAX_CHARS: usize = 80;
    let full = obj
        .repr()
        .map(|r| r.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "<unprintable>".into());
    match full.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}... ({} characters)", &full[..cut], full.chars().count()),
        None => full,
    }
}

/// A prompt: text, or token ids taken as they are.
pub(crate) enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

pub(crate) fn prompt(obj: &Bound<'_, PyAny>) -> PyResult<Prompt> {
    if obj.is_instance_of::<PyString>() {
        return str_arg(obj, "prompt").map(Prompt::Text);
    }
    if obj.cast::<PySequence>().is_err() {
        return extract::<String>(obj, "prompt", "a str, or a list of token ids").map(Prompt::Text);
    }
    id_list(obj, "prompt").map(Prompt::Ids)
}

/// The options `generate` and `chat` share: their one definition (names, defaults and
/// conversion), read from the keyword arguments both methods pass on.
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

converters! {
    min_p: f64 = "min_p", "a float in [0, 1]";
    presence_penalty: f64 = "presence_penalty", "a float from -2 to 2";
    frequency_penalty: f64 = "frequency_penalty", "a float from -2 to 2";
    logprobs: bool = "logprobs", "a bool";
    top_logprobs: Option<i64> = "top_logprobs", "an int from 0 to 20, or None";
    truncate: bool = "truncate", "a bool";
    prefix_cache_bytes: i64 = "prefix_cache_bytes", "an int >= 0";
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
