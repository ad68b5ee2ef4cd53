//! `Tokenizer`: a GGUF's own tokenizer without its weights, for counting and inspecting
//! tokens (llama.cpp's vocab-only files load too).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use pyo3::prelude::*;

use super::args;
use super::interrupt;
use crate::error::Operation;
use crate::tokenizer::Phi3Tokenizer;

#[pyclass(module = "candle_phi", name = "Tokenizer", frozen)]
pub struct PyTokenizer {
    tokenizer: Arc<Phi3Tokenizer>,
}

impl PyTokenizer {
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        work: impl FnOnce(&Phi3Tokenizer) -> crate::Result<T> + Send,
    ) -> PyResult<T> {
        let tokenizer = &self.tokenizer;
        interrupt::run(py, Operation::Tokenizing, &AtomicBool::new(false), || {
            work(tokenizer)
        })
    }
}

#[pymethods]
impl PyTokenizer {
    /// The tokenizer described by the GGUF's `tokenizer.ggml.*` metadata.
    #[staticmethod]
    fn from_gguf(
        py: Python<'_>,
        #[pyo3(from_py_with = args::gguf_path)] path: PathBuf,
    ) -> PyResult<Self> {
        let tokenizer = interrupt::run(py, Operation::Loading, &AtomicBool::new(false), || {
            Phi3Tokenizer::from_gguf_metadata(&path)
        })?;
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
        })
    }

    #[pyo3(signature = (text, *, add_special_tokens = true, parse_special = true))]
    fn encode(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::text)] text: String,
        #[pyo3(from_py_with = args::add_special_tokens)] add_special_tokens: bool,
        #[pyo3(from_py_with = args::parse_special)] parse_special: bool,
    ) -> PyResult<Vec<u32>> {
        self.run(py, |t| {
            t.encode_with(&text, add_special_tokens, parse_special)
        })
    }

    #[pyo3(signature = (token_ids, *, skip_special_tokens = false))]
    fn decode(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::token_ids)] token_ids: Vec<u32>,
        #[pyo3(from_py_with = args::skip_special_tokens)] skip_special_tokens: bool,
    ) -> PyResult<String> {
        self.run(py, |t| t.decode(&token_ids, skip_special_tokens))
    }

    #[pyo3(signature = (token, /))]
    fn token_to_id(&self, #[pyo3(from_py_with = args::token)] token: String) -> Option<u32> {
        self.tokenizer.token_to_id(&token)
    }

    /// Token ids that end generation by default.
    #[getter]
    fn end_token_ids(&self) -> Vec<u32> {
        self.tokenizer.end_token_ids().to_vec()
    }

    fn __repr__(&self) -> String {
        format!("Tokenizer.from_gguf({:?})", self.tokenizer.path())
    }
}
