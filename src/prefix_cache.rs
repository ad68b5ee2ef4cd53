//! KV states of ended streams, kept so that a later request starting with the same tokens
//! (the next turn of a chat, a shared system prompt) reads only what is new.
//!
//! Each stream owns its cache: a match takes the state out of the pool (or, when it shares
//! only a small part of that state, copies that part), so no two streams ever write to the
//! same buffers and no stream sees another's later tokens. Bounded by a byte budget, the
//! least recently used states go first.

use std::sync::Mutex;

use crate::model::Phi3Model;

/// The default budget: one full Phi-3-mini-4k context of f32 KV state is 3 GiB.
pub const DEFAULT_BUDGET_BYTES: usize = 4 << 30;

struct Entry {
    /// The tokens whose keys and values the model's cache holds, in order.
    tokens: Vec<u32>,
    model: Phi3Model,
    bytes: usize,
    last_used: u64,
}

#[derive(Default)]
struct Pool {
    entries: Vec<Entry>,
    clock: u64,
}

/// What a match hands a new stream: a state of its own, with this many prompt tokens in.
pub struct Reused {
    pub model: Phi3Model,
    pub tokens: usize,
}

pub struct PrefixCache {
    budget: usize,
    pool: Mutex<Pool>,
}

impl PrefixCache {
    /// A pool of at most `budget` bytes of KV state; 0 keeps nothing.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            pool: Mutex::new(Pool::default()),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// States kept and their bytes.
    pub fn usage(&self) -> (usize, usize) {
        let pool = self.lock();
        (
            pool.entries.len(),
            pool.entries.iter().map(|e| e.bytes).sum(),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        // The pool holds no invariant a panicking holder could break half-way.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The longest kept prefix of `prompt` usable by a sequence spanning `span` positions.
    /// At least the last prompt token is always left to compute (its logits are needed).
    pub fn take(&self, prompt: &[u32], span: usize) -> Option<Reused> {
        if self.budget == 0 || prompt.len() < 2 {
            return None;
        }
        let usable = &prompt[..prompt.len() - 1];
        let mut pool = self.lock();
        let (index, shared) = pool
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.model.serves_span(span))
            .map(|(i, e)| (i, common_prefix(&e.tokens, usable), e.last_used))
            .max_by_key(|&(_, shared, last_used)| (shared, last_used))
            .map(|(i, shared, _)| (i, shared))?;
        if shared == 0 {
            return None;
        }
        pool.clock += 1;
        let clock = pool.clock;
        let entry = &mut pool.entries[index];
        // A state mostly reused (the next turn of its chat) moves to the new stream; one
        // that shares only a small head (a system prompt) stays, and the head is copied.
        if 2 * shared >= entry.tokens.len() {
            let entry = pool.entries.swap_remove(index);
            drop(pool);
            return Some(Reused {
                model: entry.model.resume(shared, span),
                tokens: shared,
            });
        }
        entry.last_used = clock;
        let model = entry.model.fork(shared, span).ok()?;
        Some(Reused {
            model,
            tokens: shared,
        })
    }

    /// Keeps the state of an ended stream whose cache holds `tokens`.
    pub fn put(&self, tokens: Vec<u32>, model: Phi3Model) {
        let bytes = model.kv_cache_bytes();
        if tokens.is_empty() || bytes > self.budget || model.position() != tokens.len() {
            return;
        }
        let mut evicted = Vec::new();
        let mut pool = self.lock();
        pool.clock += 1;
        let last_used = pool.clock;
        // A kept state that this one extends can serve nothing this one cannot.
        let (subsumed, kept) = std::mem::take(&mut pool.entries)
            .into_iter()
            .partition(|e| tokens.starts_with(&e.tokens));
        pool.entries = kept;
        evicted.extend(subsumed);
        pool.entries.push(Entry {
            tokens,
            model,
            bytes,
            last_used,
        });
        let mut total: usize = pool.entries.iter().map(|e| e.bytes).sum();
        while total > self.budget {
            let Some(oldest) = (0..pool.entries.len()).min_by_key(|&i| pool.entries[i].last_used)
            else {
                break;
            };
            let entry = pool.entries.swap_remove(oldest);
            total -= entry.bytes;
            evicted.push(entry);
        }
        drop(pool);
        // Freed outside the lock: gigabytes of buffers take a while to unmap.
        drop(evicted);
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
