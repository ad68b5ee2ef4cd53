//! Where model and tokenizer files come from: a local path, or the Hugging Face hub through
//! its local cache (the same layout the `huggingface_hub` Python package uses).

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

pub const DEFAULT_MODEL_REPO: &str = "microsoft/Phi-3-mini-4k-instruct-gguf";
pub const DEFAULT_MODEL_FILE: &str = "Phi-3-mini-4k-instruct-q4.gguf";
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
        if is_pattern(&self.filename) {
            return self.matching_file()?.resolve(progress);
        }
        let cache_dir = cache_dir()?;
        if let Some(path) = self.cached(&cache_dir) {
            return Ok(path);
        }
        if offline() {
            return Err(self.not_cached(cache_dir));
        }
        api(cache_dir, progress)
            .map_err(|e| self.download_error(e.to_string()))?
            .repo(self.repo())
            .get(&self.filename)
            .map_err(|e| self.download_error(e.to_string()))
    }

    fn not_cached(&self, cache: PathBuf) -> Error {
        Error::NotCached {
            repo_id: self.repo_id.clone(),
            filename: self.filename.clone(),
            revision: self.revision.clone(),
            cache,
        }
    }

    fn download_error(&self, detail: String) -> Error {
        Error::Download {
            repo_id: self.repo_id.clone(),
            filename: self.filename.clone(),
            revision: self.revision.clone(),
            detail,
        }
    }

    /// The one file a glob (`"*q4.gguf"`) names: among the cached files of the revision
    /// first, then, unless offline, among the repository's files on the hub.
    fn matching_file(&self) -> Result<HubFile> {
        let pattern = glob::Pattern::new(&self.filename).map_err(|e| {
            Error::invalid_argument(
                "filename",
                format!("{:?}", self.filename),
                format!("It is not a valid glob pattern ({e})"),
            )
        })?;
        let cache_dir = cache_dir()?;
        let mut found: Vec<String> = self
            .cached_files(&cache_dir)
            .into_iter()
            .filter(|name| pattern.matches(name))
            .collect();
        if found.is_empty() {
            if offline() {
                return Err(self.not_cached(cache_dir));
            }
            let info = api(cache_dir, false)
                .and_then(|api| api.repo(self.repo()).info())
                .map_err(|e| self.download_error(e.to_string()))?;
            found = info
                .siblings
                .into_iter()
                .map(|s| s.rfilename)
                .filter(|name| pattern.matches(name))
                .collect();
        }
        found.sort();
        found.dedup();
        match found.as_slice() {
            [one] => Ok(HubFile::new(&self.repo_id, one, &self.revision)),
            [] => Err(self.download_error("no file of the repository matches it".into())),
            several => Err(Error::invalid_argument(
                "filename",
                format!("{:?}", self.filename),
                format!(
                    "It matches {} files of {} ({}); name one of them",
                    several.len(),
                    self.repo_id,
                    several.join(", ")
                ),
            )),
        }
    }

    /// The files of this revision's snapshot in the cache, as paths inside the repository.
    fn cached_files(&self, cache_dir: &std::path::Path) -> Vec<String> {
        let folder = cache_dir.join(format!("models--{}", self.repo_id.replace('/', "--")));
        let commit = std::fs::read_to_string(folder.join("refs").join(&self.revision))
            .map(|c| c.trim().to_string())
            .unwrap_or_else(|_| self.revision.clone());
        let snapshot = folder.join("snapshots").join(commit);
        let mut files = Vec::new();
        let mut pending = vec![(snapshot.clone(), 0)];
        // Bounded: a few levels, a few thousand entries.
        while let Some((dir, depth)) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten().take(4096) {
                let path = entry.path();
                if path.is_dir() && depth < 4 {
                    pending.push((path, depth + 1));
                } else if path.is_file() {
                    if let Ok(relative) = path.strip_prefix(&snapshot) {
                        files.push(relative.to_string_lossy().replace('\\', "/"));
                    }
                }
            }
        }
        files
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

/// Whether a filename is a glob pattern rather than a name.
fn is_pattern(filename: &str) -> bool {
    filename.contains(['*', '?', '['])
}

/// The hub client over our cache. Not `ApiBuilder::from_env()`: without HOME it panics
/// looking for a default cache.
fn api(
    cache_dir: PathBuf,
    progress: bool,
) -> std::result::Result<hf_hub::api::sync::Api, hf_hub::api::sync::ApiError> {
    let mut builder = ApiBuilder::from_cache(Cache::new(cache_dir)).with_progress(progress);
    if let Some(endpoint) = non_empty_env("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    builder.build()
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
