//! Where model and tokenizer files come from: a local path, or the Hugging Face hub through
//! its local cache (the same layout the `huggingface_hub` Python package uses).

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

pub const DEFAULT_MODEL_REPO: &str = "microsoft/Phi-3-mini-4k-instruct-gguf";
pub const DEFAULT_MODEL_FILE: &str = "Phi-3-mini-4k-instruct-q4.gguf";
pub const DEFAULT_TOKENIZER_REPO: &str = "microsoft/Phi-3-mini-4k-instruct";
pub const DEFAULT_TOKENIZER_FILE: &str = "tokenizer.json";
pub const DEFAULT_REVISION: &str = "main";

/// One file of a hub repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    pub repo_id: String,
    pub filename: String,
    pub revision: String,
}

impl HubFile {
    pub fn new(repo_id: &str, filename: &str, revision: &str) -> Self {
        Self {
            repo_id: repo_id.to_string(),
            filename: filename.to_string(),
            revision: revision.to_string(),
        }
    }

    /// The file's local path: from the cache when it is there (no network at all), else
    /// downloaded into the cache, unless `HF_HUB_OFFLINE` forbids the network.
    pub fn resolve(&self, progress: bool) -> Result<PathBuf> {
        let cache_dir = cache_dir()?;
        if let Some(path) = self.cached(&cache_dir) {
            return Ok(path);
        }
        if offline() {
            return Err(Error::NotCached {
                repo_id: self.repo_id.clone(),
                filename: self.filename.clone(),
                revision: self.revision.clone(),
                cache: cache_dir,
            });
        }
        let download_error = |detail: String| Error::Download {
            repo_id: self.repo_id.clone(),
            filename: self.filename.clone(),
            revision: self.revision.clone(),
            detail,
        };
        // Not `ApiBuilder::from_env()`: without HOME it panics looking for a default cache.
        let mut builder = ApiBuilder::from_cache(Cache::new(cache_dir)).with_progress(progress);
        if let Some(endpoint) = non_empty_env("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint);
        }
        let api = builder.build().map_err(|e| download_error(e.to_string()))?;
        api.repo(self.repo())
            .get(&self.filename)
            .map_err(|e| download_error(e.to_string()))
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone())
    }

    fn cached(&self, cache_dir: &std::path::Path) -> Option<PathBuf> {
        if let Some(path) = Cache::new(cache_dir.to_path_buf())
            .repo(self.repo())
            .get(&self.filename)
        {
            return Some(path);
        }
        // A commit hash as revision has no ref file: its snapshot folder is named after it.
        let folder = format!("models--{}", self.repo_id.replace('/', "--"));
        let path = cache_dir
            .join(folder)
            .join("snapshots")
            .join(&self.revision)
            .join(&self.filename);
        path.is_file().then_some(path)
    }
}

/// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`, as `huggingface_hub`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = non_empty_env("HF_HUB_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(home) = non_empty_env("HF_HOME") {
        return Ok(PathBuf::from(home).join("hub"));
    }
    // hf-hub's `Cache::default()` panics when there is no home directory.
    match std::env::home_dir().filter(|home| !home.as_os_str().is_empty()) {
        Some(home) => Ok(home.join(".cache").join("huggingface").join("hub")),
        None => Err(Error::NoCacheDir {
            detail: "there is no home directory (HOME is not set)".into(),
        }),
    }
}

/// `HF_HUB_OFFLINE` set to a true value, as `huggingface_hub` reads it.
pub fn offline() -> bool {
    non_empty_env("HF_HUB_OFFLINE").is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}
