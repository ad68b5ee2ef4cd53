//! A loaded model and its tokenizer: what a Python `Phi3Generator` holds. Immutable once
//! built, so one engine serves any number of concurrent generations.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::batch::Batcher;
use crate::chat::{ChatMessage, ChatTemplate, Role};
use crate::error::{Error, Result};
use crate::generation::{Generation, GenerationParams};
use crate::model::{self, KvCacheType, Phi3Config, Phi3Model, Phi3Weights};
use crate::prefix_cache::{PrefixCache, DEFAULT_BUDGET_BYTES};
use crate::source::{HubFile, DEFAULT_TOKENIZER_FILE};
use crate::tokenizer::Phi3Tokenizer;

/// Where a file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub(HubFile),
}

impl ModelSource {
    fn resolve(&self, progress: bool) -> Result<PathBuf> {
        match self {
            ModelSource::Local(path) => Ok(path.clone()),
            ModelSource::Hub(file) => file.resolve(progress),
        }
    }
}

/// The thread count of rayon's global pool, which runs our kernels and Candle's ops (its
/// matmuls split their work on that same pool). Sized once per process: the first call
/// sizes it, later ones must agree. Built with rayon's API, never by changing the
/// process environment while other threads may read it.
pub fn set_threads(requested: Option<usize>) -> Result<usize> {
    if requested == Some(0) {
        return Err(Error::invalid_argument(
            "n_threads",
            0,
            "It must be at least 1, or None for one per physical core",
        ));
    }
    static SIZED: std::sync::Once = std::sync::Once::new();
    SIZED.call_once(|| {
        // RAYON_NUM_THREADS if set, else one per physical core (Candle's default).
        let n = requested.unwrap_or_else(candle_core::utils::get_num_threads);
        // Fails only if the pool already exists (another library used rayon first): then
        // that pool is the one in use, and is reported below.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("candle-phi-{i}"))
            .build_global();
    });
    let threads = rayon::current_num_threads();
    match requested {
        Some(n) if n != threads => Err(Error::invalid_argument(
            "n_threads",
            n,
            format!("This process already runs its models on {threads} threads (the pool is sized once); start another process for another count"),
        )),
        _ => Ok(threads),
    }
}

/// How a model is loaded and run, beyond where it comes from.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Show a download's progress.
    pub progress: bool,
    /// Threads for the kernels; `None`: one per physical core.
    pub threads: Option<usize>,
    /// How sequences store their keys and values.
    pub kv_cache_type: KvCacheType,
    /// Q4_K, Q5_K, Q6_K and Q4_0 matrices repacked eight rows to a block at load
    /// (`quant::repacked`), in place of the file's pages; off, every matrix is read from the
    /// mapped file, which processes share and which loads at once.
    pub repack_weights: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            progress: false,
            threads: None,
            kv_cache_type: KvCacheType::default(),
            repack_weights: true,
        }
    }
}

pub struct Engine {
    weights: Arc<Phi3Weights>,
    tokenizer: Arc<Phi3Tokenizer>,
    /// The GGUF's template, or why it cannot be used (reported when chat is used, so that a
    /// template minijinja cannot compile does not stop raw-prompt generation).
    chat_template: std::result::Result<ChatTemplate, String>,
    model_path: PathBuf,
    load_time: Duration,
    threads: usize,
    /// KV states of ended streams, for later prompts that start the same way.
    prefix_cache: Arc<PrefixCache>,
    /// Runs the forward passes of every stream, batching those that step together.
    batcher: Arc<Batcher>,
}

impl Engine {
    /// Resolves and loads the model, then its tokenizer. Without a tokenizer source, a
    /// `tokenizer.json` beside a local GGUF is used, else the GGUF's own tokenizer.
    pub fn load(
        model: &ModelSource,
        tokenizer: Option<&ModelSource>,
        options: &LoadOptions,
    ) -> Result<Self> {
        Self::load_interruptible(model, tokenizer, options, &AtomicBool::new(false))
    }

    /// `load`, ending early with `Error::Interrupted` once `interrupt` is set.
    pub fn load_interruptible(
        model: &ModelSource,
        tokenizer: Option<&ModelSource>,
        options: &LoadOptions,
        interrupt: &AtomicBool,
    ) -> Result<Self> {
        let progress = options.progress;
        let threads = set_threads(options.threads)?;
        crate::heap::keep_pass_buffers();
        let start = Instant::now();
        if let Some(ModelSource::Local(path)) = tokenizer {
            if !path.is_file() {
                return Err(Error::TokenizerNotFound { path: path.clone() });
            }
        }
        let model_path = model.resolve(progress)?;
        let loaded = model::load_interruptible(
            &model_path,
            interrupt,
            options.kv_cache_type,
            options.repack_weights,
        )?;
        let vocab_size = loaded.weights.config.vocab_size;
        let tokenizer = match tokenizer
            .cloned()
            .or_else(|| tokenizer_beside(model, &model_path))
        {
            Some(source) => {
                let path = source.resolve(progress)?;
                Phi3Tokenizer::from_file(&path, &loaded.metadata, vocab_size)?
            }
            None => Phi3Tokenizer::from_gguf(&model_path, &loaded.metadata, vocab_size)?,
        };
        let chat_template =
            ChatTemplate::new(loaded.metadata.chat_template.as_deref()).map_err(|e| e.to_string());
        Ok(Self {
            weights: loaded.weights,
            tokenizer: Arc::new(tokenizer),
            chat_template,
            model_path,
            load_time: start.elapsed(),
            threads,
            prefix_cache: Arc::new(PrefixCache::new(DEFAULT_BUDGET_BYTES)),
            batcher: Arc::default(),
        })
    }

    /// Keeps at most `bytes` of ended streams' KV state for reuse; 0 keeps none.
    pub fn with_prefix_cache(mut self, bytes: usize) -> Self {
        self.prefix_cache = Arc::new(PrefixCache::new(bytes));
        self
    }

    pub fn prefix_cache(&self) -> &PrefixCache {
        &self.prefix_cache
    }

    /// The scheduler of this engine's forward passes (active streams, batch sizes).
    pub fn batcher(&self) -> &Batcher {
        &self.batcher
    }

    pub fn config(&self) -> &Phi3Config {
        &self.weights.config
    }

    /// The kernels the model's matrices run (`CANDLE_PHI_KERNELS`'s names), naming the
    /// tensor types left to Candle's.
    pub fn kernels(&self) -> String {
        self.weights.kernels_report()
    }

    pub fn kv_cache_type(&self) -> KvCacheType {
        self.weights.kv_cache_type
    }

    pub fn tokenizer(&self) -> &Arc<Phi3Tokenizer> {
        &self.tokenizer
    }

    pub fn model_path(&self) -> &Path {
        &self.model_path
    }

    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Threads the CPU kernels run on.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// A fresh sequence of at most `span` tokens: the shared weights with an empty KV cache
    /// of its own.
    pub fn new_sequence(&self, span: usize) -> Result<Phi3Model> {
        Phi3Model::new(Arc::clone(&self.weights), span).map_err(Error::generation)
    }

    /// Prepares a generation for `prompt` (raw text; special-token text is honoured).
    pub fn generate(&self, prompt: &str, params: &GenerationParams) -> Result<Generation> {
        let ids = self.tokenizer.encode(prompt, true)?;
        self.generate_ids(self.model_ids(ids)?, params)
    }

    /// Ids the tokenizer made, checked against the model: an id past the vocabulary means
    /// the tokenizer is not the model's.
    fn model_ids(&self, ids: Vec<u32>) -> Result<Vec<u32>> {
        let vocab_size = self.config().vocab_size;
        match ids.iter().find(|&&id| id as usize >= vocab_size) {
            Some(bad) => Err(Error::TokenizerMismatch {
                detail: format!(
                    "it encodes the prompt with token id {bad}, but the model's vocabulary has only {vocab_size} entries"
                ),
            }),
            None => Ok(ids),
        }
    }

    fn template(&self) -> Result<&ChatTemplate> {
        self.chat_template
            .as_ref()
            .map_err(|detail| Error::Tokenization {
                detail: detail.clone(),
            })
    }

    /// The prompt text the chat template makes of `messages`.
    /// Setting `interrupt` stops the template with `Error::Interrupted`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        interrupt: &AtomicBool,
    ) -> Result<String> {
        self.template()?
            .render(messages, add_generation_prompt, &self.tokenizer, interrupt)
    }

    /// Prepares the assistant's reply to `messages`; setting `interrupt` stops the template
    /// with `Error::Interrupted`. With `truncate`, a conversation too long for the context
    /// loses its oldest turns (system messages and the last message stay).
    pub fn chat(
        &self,
        messages: &[ChatMessage],
        params: &GenerationParams,
        truncate: bool,
        interrupt: &AtomicBool,
    ) -> Result<Generation> {
        let template = self.template()?;
        let encode = |messages: &[ChatMessage]| {
            template
                .encode(messages, true, &self.tokenizer, interrupt)
                .and_then(|ids| self.model_ids(ids))
        };
        let ids = encode(messages)?;
        let context_length = self.config().context_length;
        // With max_tokens None the reply fills what is left: at least one token must fit.
        let fits = |ids: &[u32]| ids.len() + params.max_tokens.unwrap_or(1) <= context_length;
        if !truncate || fits(&ids) {
            return self.generate_ids(ids, params);
        }
        // Cut points: drop the first `j` non-system messages, so that a user message (or
        // the last message) comes first. Fewer messages, fewer tokens: a binary search
        // finds the fewest to drop in O(log n) renders.
        let turns: Vec<usize> = (0..messages.len())
            .filter(|&i| messages[i].role != Role::System)
            .collect();
        let cuts: Vec<usize> = (1..turns.len())
            .filter(|&j| j + 1 == turns.len() || messages[turns[j]].role == Role::User)
            .collect();
        let keep = |j: usize| -> Vec<ChatMessage> {
            let last_dropped = turns[j - 1];
            messages
                .iter()
                .enumerate()
                .filter(|&(i, m)| m.role == Role::System || i > last_dropped)
                .map(|(_, m)| m.clone())
                .collect()
        };
        let (mut low, mut high) = (0, cuts.len());
        let mut best = None;
        while low < high {
            let mid = (low + high) / 2;
            let ids = encode(&keep(cuts[mid]))?;
            if fits(&ids) {
                best = Some((cuts[mid], ids));
                high = mid;
            } else {
                low = mid + 1;
            }
        }
        match best {
            Some((dropped, ids)) => {
                let mut generation = self.generate_ids(ids, params)?;
                generation.set_dropped_messages(dropped);
                Ok(generation)
            }
            // Even the system messages and the last message alone do not fit: the error
            // reports that smallest prompt.
            None => {
                let smallest = match cuts.last() {
                    Some(&j) => encode(&keep(j))?,
                    None => ids,
                };
                self.generate_ids(smallest, params)
            }
        }
    }

    pub fn generate_ids(&self, prompt: Vec<u32>, params: &GenerationParams) -> Result<Generation> {
        Generation::new(
            Arc::clone(&self.weights),
            Arc::clone(&self.tokenizer),
            prompt,
            params,
            Some(Arc::clone(&self.prefix_cache)),
            &self.batcher,
        )
    }
}

/// A `tokenizer.json` placed beside a local GGUF is that model's tokenizer.
fn tokenizer_beside(model: &ModelSource, model_path: &Path) -> Option<ModelSource> {
    let ModelSource::Local(_) = model else {
        return None;
    };
    let beside = model_path.parent()?.join(DEFAULT_TOKENIZER_FILE);
    beside.is_file().then_some(ModelSource::Local(beside))
}

impl Engine {
    /// Logits at every position of `ids`, fed `chunk_size` tokens at a time, rows in order.
    /// Setting `interrupt` stops the work between layers with `Error::Interrupted`.
    pub fn logits(
        &self,
        ids: &[u32],
        chunk_size: usize,
        interrupt: Arc<AtomicBool>,
    ) -> Result<Vec<Vec<f32>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let context_length = self.config().context_length;
        if ids.len() > context_length {
            return Err(Error::ContextLength {
                prompt_tokens: ids.len(),
                max_tokens: 0,
                context_length,
            });
        }
        let mut sequence = self.new_sequence(ids.len())?;
        sequence.set_interrupt(Arc::clone(&interrupt));
        let mut rows = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(chunk_size.max(1)) {
            let logits = sequence
                .forward_all(chunk)
                .and_then(|t| t.to_vec2::<f32>())
                .map_err(
                    |e| match interrupt.load(std::sync::atomic::Ordering::Relaxed) {
                        true => Error::Interrupted,
                        false => Error::generation(e),
                    },
                )?;
            rows.extend(logits);
        }
        Ok(rows)
    }
}
