//! Conversion of Python arguments, so that a wrong type raises `InvalidArgumentError` naming
//! the parameter and the value, like every other bad argument.

use pyo3::conversion::FromPyObjectOwned;
use pyo3::prelude::*;

use pyo3::types::{PyByteArray, PyBytes, PyMapping, PySequence, PyString};

use super::errors::to_py_err;
use crate::chat::{ChatMessage, Role};
use crate::error::Error;

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
pub(crate) fn wrong_type(obj: &Bound<'_, PyAny>, name: &str, expected: &str) -> PyErr {
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
    parse_special: bool = "parse_special", "a bool";
    gguf_path: std::path::PathBuf = "path", "a path (str or os.PathLike)";
    add_generation_prompt: bool = "add_generation_prompt", "a bool";
    chunk_size: Option<i64> = "chunk_size", "an int >= 1 or None";
    model: Option<std::path::PathBuf> = "model", "a path (str or os.PathLike) or None";
    tokenizer: Option<std::path::PathBuf> = "tokenizer", "a path (str or os.PathLike) or None";
    progress: Option<bool> = "progress", "a bool, or None to show it when stderr is a terminal";
    n_threads: Option<i64> = "n_threads", "an int >= 1 or None";
    ignore_eos: bool = "ignore_eos", "a bool";
    repack_weights: bool = "repack_weights", "a bool";
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

/// `"f16"`, `"q8_0"` or `"f32"`.
pub(crate) fn kv_cache_type(obj: &Bound<'_, PyAny>) -> PyResult<crate::KvCacheType> {
    let name = str_arg(obj, "kv_cache_type")?;
    crate::KvCacheType::from_name(&name).ok_or_else(|| {
        to_py_err(
            obj.py(),
            Error::invalid_argument(
                "kv_cache_type",
                repr(obj),
                "It must be 'f16' (the default: 2 bytes a value), 'q8_0' (8-bit blocks: 1.125 bytes, slightly less exact) or 'f32' (4 bytes)",
            ),
        )
    })
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
pub(crate) fn items<'py>(
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
pub(crate) fn repr(obj: &Bound<'_, PyAny>) -> String {
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

converters! {
    min_p: f64 = "min_p", "a float in [0, 1]";
    presence_penalty: f64 = "presence_penalty", "a float from -2 to 2";
    frequency_penalty: f64 = "frequency_penalty", "a float from -2 to 2";
    logprobs: bool = "logprobs", "a bool";
    top_logprobs: Option<i64> = "top_logprobs", "an int from 0 to 20, or None";
    truncate: bool = "truncate", "a bool";
    prefix_cache_bytes: i64 = "prefix_cache_bytes", "an int >= 0";
}
