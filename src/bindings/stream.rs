//! `TokenStream`: the Python iterator over one generation. Each `__next__` runs the model
//! work off the Python thread, GIL released; Ctrl-C stops it at the next layer, `cancel()`
//! from any thread ends it there. `events()` iterates the same generation as token events;
//! `async for` runs the same steps off the event loop (`candle_phi._aio`).

use std::sync::{Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::errors::IntoPyResult;
use super::interrupt;
use crate::error::{Error, Operation};
use crate::generation::{Controls, Generation, Stats, Step};
use crate::logprobs::TokenLogprob;

#[pyclass(module = "candle_phi", name = "TokenStream", frozen)]
pub struct PyTokenStream {
    generation: Mutex<Generation>,
    /// Interrupt and cancel flags, reachable while a step holds the lock.
    controls: Controls,
}

/// One released piece of text with the tokens it came from.
struct Event {
    text: String,
    token_ids: Vec<u32>,
    logprobs: Option<Vec<TokenLogprob>>,
}

impl PyTokenStream {
    pub(crate) fn new(generation: Generation) -> Self {
        Self {
            controls: generation.controls(),
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

    /// The stats as of the last step: never waits for a step under way, so another thread
    /// watches a long prompt progress.
    fn stats(&self, _py: Python<'_>) -> PyResult<Stats> {
        Ok(self.controls.progress())
    }

    /// Steps until a piece of text (or the end) comes out; with `tokens`, also its token
    /// ids and log-probabilities (the plain text iteration does not copy them).
    fn next_event(&self, py: Python<'_>, tokens: bool) -> PyResult<Option<Event>> {
        loop {
            let event =
                interrupt::run(py, Operation::Generating, &self.controls.interrupt, || {
                    let mut generation = self.lock()?;
                    Ok(match generation.step()? {
                        Step::Working => None,
                        Step::Finished => Some(None),
                        Step::Text(piece) if !tokens => Some(Some(Event {
                            text: piece.text,
                            token_ids: Vec::new(),
                            logprobs: None,
                        })),
                        Step::Text(piece) => Some(Some(Event {
                            token_ids: generation.generated_ids()[piece.tokens.clone()].to_vec(),
                            logprobs: generation
                                .reports_logprobs()
                                .then(|| generation.logprobs()[piece.tokens].to_vec()),
                            text: piece.text,
                        })),
                    })
                })?;
            match event {
                Some(event) => return Ok(event),
                None => py.check_signals()?,
            }
        }
    }
}

#[pymethods]
impl PyTokenStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        while let Some(event) = self.next_event(py, false)? {
            // A last piece can be empty: its tokens' text fell to a stop string.
            if !event.text.is_empty() {
                return Ok(Some(event.text));
            }
        }
        Ok(None)
    }

    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next piece, computed off the event loop; cancelling the awaiting task cancels
    /// the generation.
    fn __anext__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, PyAny>> {
        let py = slf.py();
        py.import("candle_phi._aio")?
            .call_method1("anext", (slf.clone(), slf))
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

    /// `read`, awaited: computed off the event loop.
    fn aread(slf: Bound<'_, Self>) -> PyResult<Bound<'_, PyAny>> {
        let py = slf.py();
        py.import("candle_phi._aio")?.call_method1("aread", (slf,))
    }

    /// The same generation as `TokenEvent`s: text pieces with their token ids (and
    /// log-probabilities when asked for). Shares its progress with this stream.
    fn events(slf: Py<Self>) -> PyTokenEvents {
        PyTokenEvents { stream: slf }
    }

    /// Stops the generation from any thread: the work in progress ends at its next layer
    /// and the stream ends with finish_reason "cancelled". Its state stays reusable.
    fn cancel(&self) {
        self.controls.cancel();
    }

    /// Cancels the generation if it is running and frees its state now (handing it to
    /// the generator's prefix cache).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.controls.cancel();
        py.detach(|| self.lock().map(|mut g| g.close())).py_err(py)
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    /// "stop" (an end or stop token), "length" (max_tokens reached), "cancelled", or None
    /// while running.
    #[getter]
    fn finish_reason(&self, py: Python<'_>) -> PyResult<Option<&'static str>> {
        Ok(self.stats(py)?.finish_reason.map(|r| r.as_str()))
    }

    #[getter]
    fn prompt_tokens(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.stats(py)?.prompt_tokens)
    }

    /// Prompt tokens whose state was reused from an earlier stream instead of computed.
    #[getter]
    fn cached_tokens(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.stats(py)?.cached_tokens)
    }

    /// Oldest messages `chat(..., truncate=True)` left out to fit the context.
    #[getter]
    fn dropped_messages(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.stats(py)?.dropped_messages)
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

    /// One `TokenLogprob` per generated token when asked for with `logprobs=True`, else None.
    #[getter]
    fn logprobs(&self, py: Python<'_>) -> PyResult<Option<Vec<PyTokenLogprob>>> {
        self.inspect(py, |g| {
            g.reports_logprobs()
                .then(|| g.logprobs().iter().map(PyTokenLogprob::from).collect())
        })
    }

    /// Seconds from the first step to the first generated token (prompt processing included).
    #[getter]
    fn time_to_first_token(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        Ok(self.stats(py)?.time_to_first_token.map(|d| d.as_secs_f64()))
    }

    /// Prompt tokens computed per second, once the prompt is in (reused ones not counted).
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
            "TokenStream(prompt_tokens={}, cached_tokens={}, generated_tokens={}, finish_reason={})",
            s.prompt_tokens,
            s.cached_tokens,
            s.generated_tokens,
            s.finish_reason
                .map_or("None".to_string(), |r| format!("'{}'", r.as_str()))
        ))
    }
}

/// Iterates a stream's generation as `TokenEvent`s.
#[pyclass(module = "candle_phi", name = "TokenEvents", frozen)]
pub struct PyTokenEvents {
    stream: Py<PyTokenStream>,
}

#[pymethods]
impl PyTokenEvents {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PyTokenEvent>> {
        Ok(self
            .stream
            .get()
            .next_event(py, true)?
            .map(|e| PyTokenEvent {
                text: e.text,
                token_ids: e.token_ids,
                logprobs: e
                    .logprobs
                    .map(|l| l.iter().map(PyTokenLogprob::from).collect()),
            }))
    }

    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, PyAny>> {
        let py = slf.py();
        let stream = slf.get().stream.clone_ref(py);
        py.import("candle_phi._aio")?
            .call_method1("anext", (slf, stream))
    }

    /// The stream these events come from.
    #[getter]
    fn stream(&self, py: Python<'_>) -> Py<PyTokenStream> {
        self.stream.clone_ref(py)
    }
}

/// A piece of generated text and the tokens it came from.
#[pyclass(module = "candle_phi", name = "TokenEvent", frozen, get_all)]
pub struct PyTokenEvent {
    /// The text these tokens released ("" only for a last event whose text fell to a stop
    /// string).
    text: String,
    token_ids: Vec<u32>,
    /// One `TokenLogprob` per token id when asked for with `logprobs=True`, else None.
    logprobs: Option<Vec<PyTokenLogprob>>,
}

#[pymethods]
impl PyTokenEvent {
    fn __repr__(&self) -> String {
        format!(
            "TokenEvent(text={:?}, token_ids={:?})",
            self.text, self.token_ids
        )
    }
}

/// A generated token's natural-log probability under the model's raw distribution, and
/// the most likely tokens at its position.
#[pyclass(module = "candle_phi", name = "TokenLogprob", frozen, get_all)]
#[derive(Clone)]
pub struct PyTokenLogprob {
    token_id: u32,
    logprob: f32,
    /// `TopLogprob`s, most likely first (`top_logprobs` of them).
    top_logprobs: Vec<PyTopLogprob>,
}

impl From<&TokenLogprob> for PyTokenLogprob {
    fn from(lp: &TokenLogprob) -> Self {
        Self {
            token_id: lp.token_id,
            logprob: lp.logprob,
            top_logprobs: lp
                .top
                .iter()
                .map(|&(token_id, logprob)| PyTopLogprob { token_id, logprob })
                .collect(),
        }
    }
}

#[pymethods]
impl PyTokenLogprob {
    fn __repr__(&self) -> String {
        format!(
            "TokenLogprob(token_id={}, logprob={}, top_logprobs=[{} entries])",
            self.token_id,
            self.logprob,
            self.top_logprobs.len()
        )
    }
}

/// One alternative token at a position, with its log-probability.
#[pyclass(module = "candle_phi", name = "TopLogprob", frozen, get_all)]
#[derive(Clone)]
pub struct PyTopLogprob {
    token_id: u32,
    logprob: f32,
}

#[pymethods]
impl PyTopLogprob {
    fn __repr__(&self) -> String {
        format!(
            "TopLogprob(token_id={}, logprob={})",
            self.token_id, self.logprob
        )
    }
}
