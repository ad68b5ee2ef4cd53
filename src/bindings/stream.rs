//! `TokenStream`: the Python iterator over one generation. Each `__next__` runs the model
//! work off the Python thread, GIL released; Ctrl-C stops it at the next layer.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::prelude::*;

use super::errors::IntoPyResult;
use super::interrupt;
use crate::error::{Error, Operation};
use crate::generation::{Generation, Stats, Step};

#[pyclass(module = "candle_phi", name = "TokenStream", frozen)]
pub struct PyTokenStream {
    generation: Mutex<Generation>,
    /// Stops the step in progress (the generation's own flag, reachable without the lock).
    interrupt: Arc<AtomicBool>,
}

impl PyTokenStream {
    pub(crate) fn new(generation: Generation) -> Self {
        Self {
            interrupt: generation.interrupt_flag(),
            generation: Mutex::new(generation),
        }
    }

    fn lock(&self) -> crate::Result<MutexGuard<'_, Generation>> {
        self.generation.lock().map_err(|_| Error::Generation {
            detail: "this stream failed earlier and cannot continue; start a new one".into(),
        })
    }

    /// Reads the generation; waits (GIL released, so other threads run) while another
    /// thread's step holds it.
    fn inspect<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Generation) -> T + Send,
    ) -> PyResult<T> {
        py.detach(|| self.lock().map(|g| f(&g))).py_err(py)
    }

    fn stats(&self, py: Python<'_>) -> PyResult<Stats> {
        self.inspect(py, Generation::stats)
    }
}

#[pymethods]
impl PyTokenStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        loop {
            let step = interrupt::run(py, Operation::Generating, &self.interrupt, || {
                self.lock()?.step()
            })?;
            match step {
                Step::Text(text) => return Ok(Some(text)),
                Step::Finished => return Ok(None),
                Step::Working => py.check_signals()?,
            }
        }
    }

    /// The rest of the text, at once: the same text the iteration would give.
    fn read(&self, py: Python<'_>) -> PyResult<String> {
        let mut text = String::new();
        while let Some(piece) = self.__next__(py)? {
            text.push_str(&piece);
            py.check_signals()?;
        }
        Ok(text)
    }

    /// "stop" (an end or stop token), "length" (max_tokens reached), or None while running.
    #[getter]
    fn finish_reason(&self, py: Python<'_>) -> PyResult<Option<&'static str>> {
        Ok(self.stats(py)?.finish_reason.map(|r| r.as_str()))
    }

    #[getter]
    fn prompt_tokens(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.stats(py)?.prompt_tokens)
    }

    #[getter]
    fn generated_tokens(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.stats(py)?.generated_tokens)
    }

    /// The generated token ids so far; end and stop tokens are not included.
    #[getter]
    fn token_ids(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        self.inspect(py, |g| g.generated_ids().to_vec())
    }

    /// Seconds from the first step to the first generated token (prompt processing included).
    #[getter]
    fn time_to_first_token(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        Ok(self.stats(py)?.time_to_first_token.map(|d| d.as_secs_f64()))
    }

    /// Prompt tokens processed per second, once the prompt is in.
    #[getter]
    fn prompt_tokens_per_second(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        Ok(self.stats(py)?.prompt_tokens_per_second())
    }

    /// Tokens generated per second after the first one.
    #[getter]
    fn generation_tokens_per_second(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        Ok(self.stats(py)?.generation_tokens_per_second())
    }

    /// The prompt as token ids, as the model sees it (chat template applied).
    #[getter]
    fn prompt_token_ids(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        self.inspect(py, |g| g.prompt_ids().to_vec())
    }

    /// The seed in use (drawn at random when none was given).
    #[getter]
    fn seed(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.stats(py)?.seed)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let s = self.stats(py)?;
        Ok(format!(
            "TokenStream(prompt_tokens={}, generated_tokens={}, finish_reason={})",
            s.prompt_tokens,
            s.generated_tokens,
            s.finish_reason
                .map_or("None".to_string(), |r| format!("'{}'", r.as_str()))
        ))
    }
}
