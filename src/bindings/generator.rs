//! `Phi3Generator`: a loaded model and tokenizer. Frozen and shareable across threads; each
//! `generate` call returns a stream with its own KV cache over the shared weights.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyType};

use super::args;
use super::errors::IntoPyResult;
use super::interrupt;
use super::options;
use super::stream::PyTokenStream;
use crate::chat::ChatMessage;
use crate::engine::{Engine, LoadOptions, ModelSource};
use crate::error::{Error, Operation};
use crate::generation::Generation;
use crate::model::KvCacheType;
use crate::prefix_cache::DEFAULT_BUDGET_BYTES;
use crate::source::{
    HubFile, DEFAULT_MODEL_FILE, DEFAULT_MODEL_REPO, DEFAULT_REVISION, DEFAULT_TOKENIZER_FILE,
};

#[pyclass(module = "candle_phi", name = "Phi3Generator", frozen)]
pub struct PyPhi3Generator {
    engine: Arc<Engine>,
}

impl PyPhi3Generator {
    /// Prepares a generation with the GIL released (template, tokenizing and checks).
    fn start(
        &self,
        py: Python<'_>,
        operation: Operation,
        prepare: impl FnOnce(&Engine, &AtomicBool) -> crate::Result<Generation> + Send,
    ) -> PyResult<PyTokenStream> {
        let generation = self.run(py, operation, prepare)?;
        Ok(PyTokenStream::new(generation))
    }

    /// Engine work off the Python thread: Ctrl-C lands during it (and sets the flag the
    /// work is given), panics become errors.
    fn run<T: Send>(
        &self,
        py: Python<'_>,
        operation: Operation,
        work: impl FnOnce(&Engine, &AtomicBool) -> crate::Result<T> + Send,
    ) -> PyResult<T> {
        let engine = &self.engine;
        let stop = AtomicBool::new(false);
        interrupt::run(py, operation, &stop, || work(engine, &stop))
    }
}

#[pymethods]
impl PyPhi3Generator {
    #[new]
    #[pyo3(text_signature = "(model=None, *, tokenizer=None, \
        repo_id='microsoft/Phi-3-mini-4k-instruct-gguf', \
        filename='Phi-3-mini-4k-instruct-q4.gguf', revision='main', tokenizer_repo_id=None, \
        tokenizer_revision='main', progress=None, n_threads=None, \
        prefix_cache_bytes=4294967296, kv_cache_type='f16', repack_weights=True)")]
    #[pyo3(signature = (
        model = None,
        *,
        tokenizer = None,
        repo_id = DEFAULT_MODEL_REPO.to_string(),
        filename = DEFAULT_MODEL_FILE.to_string(),
        revision = DEFAULT_REVISION.to_string(),
        tokenizer_repo_id = None,
        tokenizer_revision = DEFAULT_REVISION.to_string(),
        progress = None,
        n_threads = None,
        prefix_cache_bytes = DEFAULT_BUDGET_BYTES as i64,
        kv_cache_type = KvCacheType::default(),
        repack_weights = true,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        #[pyo3(from_py_with = args::model)] model: Option<PathBuf>,
        #[pyo3(from_py_with = args::tokenizer)] tokenizer: Option<PathBuf>,
        #[pyo3(from_py_with = args::repo_id)] repo_id: String,
        #[pyo3(from_py_with = args::filename)] filename: String,
        #[pyo3(from_py_with = args::revision)] revision: String,
        #[pyo3(from_py_with = args::tokenizer_repo_id)] tokenizer_repo_id: Option<String>,
        #[pyo3(from_py_with = args::tokenizer_revision)] tokenizer_revision: String,
        #[pyo3(from_py_with = args::progress)] progress: Option<bool>,
        #[pyo3(from_py_with = args::n_threads)] n_threads: Option<i64>,
        #[pyo3(from_py_with = args::prefix_cache_bytes)] prefix_cache_bytes: i64,
        #[pyo3(from_py_with = args::kv_cache_type)] kv_cache_type: KvCacheType,
        #[pyo3(from_py_with = args::repack_weights)] repack_weights: bool,
    ) -> PyResult<Self> {
        let prefix_cache_bytes = args::non_negative(
            py,
            prefix_cache_bytes,
            "prefix_cache_bytes",
            "It must be >= 0 (0 keeps no state between calls)",
        )?;
        let n_threads = n_threads
            .map(|n| args::non_negative(py, n, "n_threads", "It must be at least 1, or None"))
            .transpose()?;
        let model = match model {
            Some(path) => ModelSource::Local(path),
            None => ModelSource::Hub(HubFile::new(&repo_id, &filename, &revision)),
        };
        let tokenizer = match (tokenizer, tokenizer_repo_id) {
            (Some(path), _) => Some(ModelSource::Local(path)),
            (None, Some(repo)) => Some(ModelSource::Hub(HubFile::new(
                &repo,
                DEFAULT_TOKENIZER_FILE,
                &tokenizer_revision,
            ))),
            (None, None) => None,
        };
        // A download shows its progress where someone watches: a terminal.
        let progress = progress.unwrap_or_else(|| std::io::stderr().is_terminal());
        let stop = AtomicBool::new(false);
        let options = LoadOptions {
            progress,
            threads: n_threads,
            kv_cache_type,
            repack_weights,
        };
        let engine = interrupt::run(py, Operation::Loading, &stop, || {
            Engine::load_interruptible(&model, tokenizer.as_ref(), &options, &stop)
        })?;
        Ok(Self {
            engine: Arc::new(engine.with_prefix_cache(prefix_cache_bytes)),
        })
    }

    /// Loads `filename` of the hub repository `repo_id`; a glob (`"*q4.gguf"`) names the
    /// one file it matches, among the cached files first, then on the hub unless offline.
    /// Other keywords are the constructor's.
    #[classmethod]
    #[pyo3(
        text_signature = "(repo_id, filename='Phi-3-mini-4k-instruct-q4.gguf', *, \
        tokenizer=None, revision='main', tokenizer_repo_id=None, tokenizer_revision='main', \
        progress=None, n_threads=None, prefix_cache_bytes=4294967296, kv_cache_type='f16', \
        repack_weights=True)"
    )]
    #[pyo3(signature = (repo_id, filename = DEFAULT_MODEL_FILE.to_string(), **kwargs))]
    fn from_pretrained<'py>(
        cls: &Bound<'py, PyType>,
        #[pyo3(from_py_with = args::repo_id)] repo_id: String,
        #[pyo3(from_py_with = args::filename)] filename: String,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = cls.py();
        let kwargs = match kwargs {
            Some(given) => given.copy()?,
            None => PyDict::new(py),
        };
        for name in ["model", "repo_id", "filename"] {
            if kwargs.contains(name)? {
                return Err(super::errors::to_py_err(
                    py,
                    Error::invalid_argument(
                        name,
                        "given twice",
                        "from_pretrained takes the repository and file as its arguments; for a local file use Phi3Generator(path)",
                    ),
                ));
            }
        }
        kwargs.set_item("repo_id", repo_id)?;
        kwargs.set_item("filename", filename)?;
        cls.call((), Some(&kwargs))
    }

    /// Starts generating from `prompt`: raw text (special-token text such as `<|user|>`
    /// becomes the control token), or token ids. Nothing is computed until iterated. The
    /// options (max_tokens, temperature, ...) are those of `chat`; see `GenerationOptions`.
    #[pyo3(text_signature = "(self, /, prompt, **options)")]
    #[pyo3(signature = (prompt, **options))]
    fn generate(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::prompt)] prompt: args::Prompt,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyTokenStream> {
        let params =
            options::GenerationOptions::from_kwargs("generate", options)?.into_params(py)?;
        self.start(py, Operation::Tokenizing, |engine, _| match prompt {
            args::Prompt::Text(text) => engine.generate(&text, &params),
            args::Prompt::Ids(ids) => engine.generate_ids(ids, &params),
        })
    }

    /// Starts the assistant's reply to `messages` (dicts with `role` and `content`), in the
    /// model's chat format. Message text never becomes a control token. With `truncate`, a
    /// conversation too long for the context loses its oldest turns instead of raising.
    #[pyo3(text_signature = "(self, /, messages, *, truncate=False, **options)")]
    #[pyo3(signature = (messages, *, truncate = false, **options))]
    fn chat(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::messages)] messages: Vec<ChatMessage>,
        #[pyo3(from_py_with = args::truncate)] truncate: bool,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyTokenStream> {
        let params = options::GenerationOptions::from_kwargs("chat", options)?.into_params(py)?;
        self.start(py, Operation::RenderingTemplate, |engine, stop| {
            engine.chat(&messages, &params, truncate, stop)
        })
    }

    /// The prompt text the model's chat template makes of `messages`.
    #[pyo3(signature = (messages, *, add_generation_prompt = true))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::messages)] messages: Vec<ChatMessage>,
        #[pyo3(from_py_with = args::add_generation_prompt)] add_generation_prompt: bool,
    ) -> PyResult<String> {
        self.run(py, Operation::RenderingTemplate, |engine, stop| {
            engine.apply_chat_template(&messages, add_generation_prompt, stop)
        })
    }

    /// Token ids of `text`; with `add_special_tokens` the tokenizer's BOS is prepended.
    #[pyo3(signature = (text, *, add_special_tokens = true))]
    fn tokenize(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::text)] text: String,
        #[pyo3(from_py_with = args::add_special_tokens)] add_special_tokens: bool,
    ) -> PyResult<Vec<u32>> {
        self.run(py, Operation::Tokenizing, |engine, _| {
            engine.tokenizer().encode(&text, add_special_tokens)
        })
    }

    #[pyo3(signature = (token_ids, *, skip_special_tokens = false))]
    fn detokenize(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::token_ids)] token_ids: Vec<u32>,
        #[pyo3(from_py_with = args::skip_special_tokens)] skip_special_tokens: bool,
    ) -> PyResult<String> {
        self.run(py, Operation::Tokenizing, |engine, _| {
            engine.tokenizer().decode(&token_ids, skip_special_tokens)
        })
    }

    /// The model's logits at every position of `token_ids`, fed in chunks of `chunk_size`
    /// tokens (all at once by default). For inspection and tests; generation does not use it.
    #[pyo3(signature = (token_ids, *, chunk_size = None))]
    fn logits(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = args::token_ids)] token_ids: Vec<u32>,
        #[pyo3(from_py_with = args::chunk_size)] chunk_size: Option<i64>,
    ) -> PyResult<Vec<Vec<f32>>> {
        let chunk_size = match chunk_size {
            None => token_ids.len().max(1),
            Some(n) if n >= 1 => n as usize,
            Some(n) => {
                return Err(Error::invalid_argument(
                    "chunk_size",
                    n,
                    "It must be at least 1, or None",
                ))
                .py_err(py)
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        interrupt::run(py, Operation::Generating, &stop, || {
            self.engine
                .logits(&token_ids, chunk_size, Arc::clone(&stop))
        })
    }

    /// Tokens the model can attend to: prompt plus generated tokens must fit.
    #[getter]
    fn context_length(&self) -> usize {
        self.engine.config().context_length
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.engine.config().vocab_size
    }

    /// The id of one token of the vocabulary (e.g. `"<|end|>"`), or None if it has none.
    #[pyo3(signature = (token, /))]
    fn token_to_id(&self, #[pyo3(from_py_with = args::token)] token: String) -> Option<u32> {
        self.engine.tokenizer().token_to_id(&token)
    }

    /// Token ids that end generation by default (`<|end|>`, `<|endoftext|>`, the GGUF's EOS).
    #[getter]
    fn end_token_ids(&self) -> Vec<u32> {
        self.engine.tokenizer().end_token_ids().to_vec()
    }

    #[getter]
    fn model_path(&self) -> PathBuf {
        self.engine.model_path().to_path_buf()
    }

    #[getter]
    fn tokenizer_path(&self) -> PathBuf {
        self.engine.tokenizer().path().to_path_buf()
    }

    /// The matrix kernels this CPU runs for the model: "avx-vnni", "avx512-vnni", "avx2",
    /// "scalar" or "candle" (`CANDLE_PHI_KERNELS` picks others), and any tensor types left
    /// to Candle's ("avx2; candle for Q8_K").
    #[getter]
    fn kernels(&self) -> String {
        self.engine.kernels()
    }

    /// Threads the CPU kernels run on (process-wide; one per physical core by default).
    #[getter]
    fn n_threads(&self) -> usize {
        self.engine.threads()
    }

    /// How keys and values are stored: 'f16', 'q8_0' or 'f32'.
    #[getter]
    fn kv_cache_type(&self) -> &'static str {
        self.engine.kv_cache_type().name()
    }

    /// The most bytes of ended streams' KV state kept for reuse (0: none).
    #[getter]
    fn prefix_cache_bytes(&self) -> usize {
        self.engine.prefix_cache().budget()
    }

    /// Ended streams' states kept for reuse now, and their bytes.
    #[getter]
    fn prefix_cache_usage(&self) -> (usize, usize) {
        self.engine.prefix_cache().usage()
    }

    /// Streams started and not yet ended (finished, cancelled, closed or dropped).
    #[getter]
    fn active_streams(&self) -> usize {
        self.engine.batcher().active_streams()
    }

    /// Forward passes run so far and the stream steps they served: concurrent streams
    /// share passes, so steps / passes is the mean batch size.
    #[getter]
    fn pass_counts(&self) -> (u64, u64) {
        self.engine.batcher().pass_counts()
    }

    /// Seconds spent resolving and loading the model and tokenizer.
    #[getter]
    fn load_time(&self) -> f64 {
        self.engine.load_time().as_secs_f64()
    }

    fn __repr__(&self) -> String {
        let c = self.engine.config();
        format!(
            "Phi3Generator(model='{}', layers={}, hidden_size={}, context_length={})",
            self.engine.model_path().display(),
            c.num_layers,
            c.hidden_size,
            c.context_length
        )
    }
}
