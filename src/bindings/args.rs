//! Conversion of Python arguments, so that a wrong type raises `InvalidArgumentError` naming
//! the parameter and the value, like every other bad argument.

use pyo3::conversion::FromPyObjectOwned;
use pyo3::prelude::*;

use pyo3::types::{PyMapping, PyString};

use super::errors::to_py_err;
use crate::chat::{ChatMessage, Role};
use crate::error::Error;
use crate::generation::GenerationParams;
use crate::sampling::SamplingParams;

pub(crate) fn extract<'py, T: FromPyObjectOwned<'py>>(
    obj: &Bound<'py, PyAny>,
    name: &'static str,
    expected: &str,
) -> PyResult<T> {
    let py = obj.py();
    // bool is an int subclass in Python; True as a token count is a mistake, not a 1.
    let wrong_bool = obj.is_instance_of::<pyo3::types::PyBool>() && !expected.contains("bool");
    match obj.extract::<T>() {
        Ok(value) if !wrong_bool => Ok(value),
        _ => {
            let value = obj
                .repr()
                .map(|r| r.to_string())
                .unwrap_or_else(|_| "<unprintable>".into());
            let type_name = obj
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default();
            Err(to_py_err(
                py,
                Error::invalid_argument(
                    name,
                    format!("{value} (of type {type_name})"),
                    format!("It must be {expected}"),
                ),
            ))
        }
    }
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
    stop_token_ids: Option<Vec<i64>> = "stop_token_ids", "a list of token ids (ints) or None";
    token_ids: Vec<i64> = "token_ids", "a list of token ids (ints)";

    text: String = "text", "a str";
    token: String = "token", "a str";
    skip_special_tokens: bool = "skip_special_tokens", "a bool";
    add_special_tokens: bool = "add_special_tokens", "a bool";
    add_generation_prompt: bool = "add_generation_prompt", "a bool";
    chunk_size: Option<i64> = "chunk_size", "an int >= 1 or None";
    model: Option<std::path::PathBuf> = "model", "a path (str or os.PathLike) or None";
    tokenizer: Option<std::path::PathBuf> = "tokenizer", "a path (str or os.PathLike) or None";
    repo_id: String = "repo_id", "a str";
    filename: String = "filename", "a str";
    revision: String = "revision", "a str";
    tokenizer_repo_id: Option<String> = "tokenizer_repo_id", "a str or None";
    tokenizer_revision: String = "tokenizer_revision", "a str";
    progress: bool = "progress", "a bool";
    n_threads: Option<i64> = "n_threads", "an int >= 1 or None";
    ignore_eos: bool = "ignore_eos", "a bool";
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

/// Token ids as `u32`, rejecting negatives and out-of-range values.
pub(crate) fn token_id_list(
    py: Python<'_>,
    ids: Vec<i64>,
    name: &'static str,
) -> PyResult<Vec<u32>> {
    ids.into_iter()
        .map(|id| {
            u32::try_from(id).map_err(|_| {
                to_py_err(
                    py,
                    Error::invalid_argument(name, id, "Token ids are ints from 0 to 2**32 - 1"),
                )
            })
        })
        .collect()
}

/// `stop`: None, one string, or a sequence of strings.
pub(crate) fn stop(obj: &Bound<'_, PyAny>) -> PyResult<Option<Vec<String>>> {
    if let Ok(one) = obj.cast::<PyString>() {
        return Ok(Some(vec![one.to_str()?.to_string()]));
    }
    extract(obj, "stop", "a str, a list of str, or None")
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
    let items: Vec<Bound<'_, PyAny>> = extract(obj, "messages", "a list of message dicts")?;
    items
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
                value.extract::<String>().map_err(|_| {
                    bad(
                        format!("messages[{i}]['{key}']"),
                        repr(&value),
                        format!("messages[{i}]['{key}'] must be a str"),
                    )
                })
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

fn repr(obj: &Bound<'_, PyAny>) -> String {
    obj.repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "<unprintable>".into())
}

/// The generation arguments shared by `generate` and `chat`, as Python passed them.
pub(crate) struct GenerationArgs {
    pub max_tokens: Option<i64>,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub repeat_penalty: f64,
    pub repeat_last_n: i64,
    pub stop: Option<Vec<String>>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub ignore_eos: bool,
}

/// A prompt: text, or token ids taken as they are.
pub(crate) enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

pub(crate) fn prompt(obj: &Bound<'_, PyAny>) -> PyResult<Prompt> {
    if let Ok(text) = obj.cast::<PyString>() {
        return Ok(Prompt::Text(text.to_str()?.to_string()));
    }
    let ids: Vec<i64> = extract(obj, "prompt", "a str, or a list of token ids")?;
    token_id_list(obj.py(), ids, "prompt").map(Prompt::Ids)
}

impl GenerationArgs {
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
        Ok(GenerationParams {
            max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k,
                seed,
                repeat_penalty: self.repeat_penalty as f32,
                repeat_last_n,
            },
            stop_token_ids: token_id_list(
                py,
                self.stop_token_ids.unwrap_or_default(),
                "stop_token_ids",
            )?,
            stop: self.stop.unwrap_or_default(),
            ignore_eos: self.ignore_eos,
        })
    }
}
