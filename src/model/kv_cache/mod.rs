//! A key/value cache that grows with use, so a stream costs memory for the tokens it has
//! seen rather than for the whole context window up front, stored compactly: f16 by
//! default (half of f32's bytes; llama.cpp's default too), 8-bit blocks, or f32.
//!
//! Rows live in pages of `PAGE` tokens: growing adds pages, so nothing is ever copied or
//! held twice (a buffer that doubled held its old and new copy at once: half as much KV
//! again at the peak), and a forked sequence (a conversation's next turn, through prefix
//! reuse) shares its prefix's pages, copying one only when it writes into it.

mod element;
mod page;

use std::sync::Arc;

use candle_core::{CpuStorage, Result, Storage, Tensor};

pub use element::{Element, F16, F32, Q8};
use page::Page;

/// Tokens per page. Each head's rows in a page are contiguous (48 KiB for Phi-3-mini in
/// f16), long runs for the hardware prefetchers, and the rows not yet written in a page
/// cost no memory (the kernel maps memory in as it is written). Pages are mappings of
/// their own: a full 4k context of Phi-3-mini is 1,024 of them, far below the kernel's
/// 65,530 per process (`vm.max_map_count`), with many sequences alive.
pub const PAGE: usize = 256;

/// How the cache stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheType {
    F32,
    #[default]
    F16,
    /// Blocks of 32 values in 8 bits with one f32 scale each (llama.cpp's q8_0 layout,
    /// but a 4-byte scale: 1.125 bytes a value).
    Q8_0,
}

impl KvCacheType {
    pub const ALL: [Self; 3] = [Self::F16, Self::Q8_0, Self::F32];

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Bytes one row of `head_dim` values takes.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        match self {
            Self::F32 => 4 * head_dim,
            Self::F16 => 2 * head_dim,
            Self::Q8_0 => Q8::units(head_dim),
        }
    }
}

/// `PAGE` tokens of every head, head-major: `(kv_heads, PAGE)` rows of `E::units(head_dim)`
/// units, so a head's rows in the page are one contiguous run that attention streams.
/// Shared between the sequences forked from one prefix until one writes into it.
type SharedPage<E> = Arc<Page<<E as Element>::Unit>>;

/// Keys and values of every head, in one format, page by page.
pub struct Buffers<E: Element> {
    keys: Vec<SharedPage<E>>,
    values: Vec<SharedPage<E>>,
}

impl<E: Element> std::fmt::Debug for Buffers<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The sizes, not megabytes of numbers.
        write!(
            f,
            "Buffers({} pages of keys and of values)",
            self.keys.len()
        )
    }
}

#[derive(Debug)]
enum Store {
    F32(Buffers<F32>),
    F16(Buffers<F16>),
    Q8(Buffers<Q8>),
}

/// The cache's rows, by format, for attention to dispatch on once per call.
pub enum Rows<'a> {
    F32(HeadRows<'a, F32>, HeadRows<'a, F32>),
    F16(HeadRows<'a, F16>, HeadRows<'a, F16>),
    Q8(HeadRows<'a, Q8>, HeadRows<'a, Q8>),
}

/// Every head's keys (or values) in one format.
pub struct HeadRows<'a, E: Element> {
    pages: &'a [SharedPage<E>],
    head_dim: usize,
}

impl<E: Element> Clone for HeadRows<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E: Element> Copy for HeadRows<'_, E> {}

impl<'a, E: Element> HeadRows<'a, E> {
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The stored row of head `h` at position `j`.
    #[inline(always)]
    pub fn row(&self, h: usize, j: usize) -> &'a [E::Unit] {
        let units = E::units(self.head_dim);
        let at = (h * PAGE + j % PAGE) * units;
        &self.pages[j / PAGE].units()[at..at + units]
    }
}

#[derive(Debug)]
pub struct KvCache {
    kind: KvCacheType,
    kv_heads: usize,
    head_dim: usize,
    store: Store,
    len: usize,
    /// The most tokens the current request may hold.
    max_len: usize,
}

impl KvCache {
    pub fn new(kind: KvCacheType, kv_heads: usize, head_dim: usize, max_len: usize) -> Self {
        Self {
            kind,
            kv_heads,
            head_dim,
            store: Store::empty(kind),
            len: 0,
            max_len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Forgets every token from position `len` on (their rows are overwritten later).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Lets the cache grow to `max_len` tokens (a reused cache serves a new request).
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
    }

    /// A cache of its own holding the first `len` tokens: it shares their pages until
    /// either side writes into one.
    pub fn copy_prefix(&self, len: usize, max_len: usize) -> Self {
        let len = len.min(self.len);
        Self {
            store: self.store.first_pages(len.div_ceil(PAGE)),
            len,
            max_len,
            ..*self
        }
    }

    /// Tokens the pages hold room for; rows past `len` are unused.
    pub fn capacity(&self) -> usize {
        self.store.pages() * PAGE
    }

    /// Bytes of the pages this cache holds (shared ones too).
    pub fn bytes(&self) -> usize {
        2 * self.kv_heads * self.capacity() * self.kind.row_bytes(self.head_dim)
    }

    /// Appends keys and values of shape (1, kv_heads, seq, head_dim), f32, any strides.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let seq = k.dim(2)?;
        let expected = (1, self.kv_heads, seq, self.head_dim);
        if k.dims4()? != expected || v.dims4()? != expected {
            candle_core::bail!(
                "KV cache: keys {:?} and values {:?}, expected {expected:?}",
                k.dims(),
                v.dims()
            )
        }
        let needed = self.len + seq;
        if needed > self.max_len {
            candle_core::bail!(
                "the KV cache holds at most {} tokens, {needed} were asked for",
                self.max_len
            )
        }
        let place = Placement {
            kv_heads: self.kv_heads,
            len: self.len,
            seq,
            d: self.head_dim,
        };
        match &mut self.store {
            Store::F32(b) => b.write(&place, k, v)?,
            Store::F16(b) => b.write(&place, k, v)?,
            Store::Q8(b) => b.write(&place, k, v)?,
        }
        self.len = needed;
        Ok(())
    }

    /// Every cached row so far, for attention.
    pub fn rows(&self) -> Rows<'_> {
        fn pair<'a, E: Element>(
            b: &'a Buffers<E>,
            c: &KvCache,
        ) -> (HeadRows<'a, E>, HeadRows<'a, E>) {
            let rows = |pages| HeadRows {
                pages,
                head_dim: c.head_dim,
            };
            (rows(&b.keys), rows(&b.values))
        }
        match &self.store {
            Store::F32(b) => {
                let (k, v) = pair(b, self);
                Rows::F32(k, v)
            }
            Store::F16(b) => {
                let (k, v) = pair(b, self);
                Rows::F16(k, v)
            }
            Store::Q8(b) => {
                let (k, v) = pair(b, self);
                Rows::Q8(k, v)
            }
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }
}

/// Where an append's rows go: positions `len..len + seq`.
struct Placement {
    kv_heads: usize,
    len: usize,
    seq: usize,
    d: usize,
}

impl Store {
    fn empty(kind: KvCacheType) -> Self {
        match kind {
            KvCacheType::F32 => Self::F32(Buffers::empty()),
            KvCacheType::F16 => Self::F16(Buffers::empty()),
            KvCacheType::Q8_0 => Self::Q8(Buffers::empty()),
        }
    }

    fn pages(&self) -> usize {
        match self {
            Self::F32(b) => b.keys.len(),
            Self::F16(b) => b.keys.len(),
            Self::Q8(b) => b.keys.len(),
        }
    }

    /// The first `count` pages, shared.
    fn first_pages(&self, count: usize) -> Self {
        match self {
            Self::F32(b) => Self::F32(b.first_pages(count)),
            Self::F16(b) => Self::F16(b.first_pages(count)),
            Self::Q8(b) => Self::Q8(b.first_pages(count)),
        }
    }
}

impl<E: Element> Buffers<E> {
    fn empty() -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    fn first_pages(&self, count: usize) -> Self {
        let count = count.min(self.keys.len());
        Self {
            keys: self.keys[..count].to_vec(),
            values: self.values[..count].to_vec(),
        }
    }

    fn write(&mut self, at: &Placement, k: &Tensor, v: &Tensor) -> Result<()> {
        let units = E::units(at.d);
        let pages = (at.len + at.seq).div_ceil(PAGE);
        let no_memory = |e: std::io::Error| {
            candle_core::Error::Msg(format!(
                "no memory for the KV cache's next page ({e}); free memory, ask for fewer \
                 tokens, or keep keys and values in 8 bits (kv_cache_type=\"q8_0\")"
            ))
        };
        for buffer in [&mut self.keys, &mut self.values] {
            while buffer.len() < pages {
                let page = Page::zeroed(at.kv_heads * PAGE * units).map_err(no_memory)?;
                buffer.push(Arc::new(page));
            }
        }
        for (buffer, tensor) in [(&mut self.keys, k), (&mut self.values, v)] {
            let (storage, layout) = tensor.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
                candle_core::bail!("KV cache: keys and values must be f32 on the CPU")
            };
            let &[_, sh, sn, sd] = layout.stride() else {
                candle_core::bail!("KV cache: keys and values must have 4 dimensions")
            };
            let start = layout.start_offset();
            let mut row = vec![0f32; at.d];
            let (mut first, last) = (at.len, at.len + at.seq);
            while first < last {
                // The positions in this page; a page still shared with another sequence is
                // copied first, the rows this cache holds of it (once: the copy is its own).
                let end = ((first / PAGE + 1) * PAGE).min(last);
                let shared = &mut buffer[first / PAGE];
                if Arc::get_mut(shared).is_none() {
                    let kept = (first % PAGE) * units;
                    let copy = shared.try_clone_runs(PAGE * units, kept);
                    *shared = Arc::new(copy.map_err(no_memory)?);
                }
                let page = Arc::get_mut(shared)
                    .expect("a page of its own: just copied")
                    .units_mut();
                for h in 0..at.kv_heads {
                    for pos in first..end {
                        let from = start + h * sh + (pos - at.len) * sn;
                        for (c, x) in row.iter_mut().enumerate() {
                            *x = data[from + c * sd];
                        }
                        let to = (h * PAGE + pos % PAGE) * units;
                        E::encode(&row, &mut page[to..to + units]);
                    }
                }
                first = end;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(heads: usize, seq: usize, d: usize, seed: f32) -> Tensor {
        let data: Vec<f32> = (0..heads * seq * d)
            .map(|i| ((i as f32 + seed) * 0.37).sin())
            .collect();
        Tensor::from_vec(data, (1, heads, seq, d), &Device::Cpu).unwrap()
    }

    /// The key (`value` false) or value of head `h` at position `j`, decoded.
    fn stored(cache: &KvCache, h: usize, j: usize, value: bool) -> Vec<f32> {
        fn pick<'a, E: Element>(
            k: HeadRows<'a, E>,
            v: HeadRows<'a, E>,
            value: bool,
        ) -> HeadRows<'a, E> {
            if value {
                v
            } else {
                k
            }
        }
        let mut out = vec![0f32; cache.head_dim];
        match cache.rows() {
            Rows::F32(k, v) => F32::decode(pick(k, v, value).row(h, j), &mut out),
            Rows::F16(k, v) => F16::decode(pick(k, v, value).row(h, j), &mut out),
            Rows::Q8(k, v) => Q8::decode(pick(k, v, value).row(h, j), &mut out),
        }
        out
    }

    #[test]
    fn appends_grow_and_keep_every_row() {
        for kind in KvCacheType::ALL {
            let (heads, d) = (2, 40);
            let mut cache = KvCache::new(kind, heads, d, 6 * PAGE);
            // A prompt, then decode steps into a new page.
            let first = tensor(heads, 4 * PAGE - 6, d, 0.0);
            cache.append(&first, &first).unwrap();
            assert_eq!(cache.capacity(), 4 * PAGE, "{kind:?}");
            let steps: Vec<Tensor> = (0..10)
                .map(|i| tensor(heads, 1, d, 1e4 + i as f32))
                .collect();
            for step in &steps {
                cache.append(step, step).unwrap();
            }
            assert_eq!((cache.len(), cache.capacity()), (4 * PAGE + 4, 5 * PAGE));
            assert_eq!(cache.bytes(), 2 * heads * 5 * PAGE * kind.row_bytes(d));
            for h in 0..heads {
                check(&cache, h, 7, &first, 7);
                check(&cache, h, 4 * PAGE - 7, &first, 4 * PAGE - 7);
                check(&cache, h, 4 * PAGE - 1, &steps[5], 0);
                check(&cache, h, 4 * PAGE, &steps[6], 0);
            }
            let copy = cache.copy_prefix(4 * PAGE, 6 * PAGE);
            assert_eq!((copy.len(), copy.capacity()), (4 * PAGE, 4 * PAGE));
            check(&copy, 1, 4 * PAGE - 7, &first, 4 * PAGE - 7);
            check(&copy, 1, 4 * PAGE - 1, &steps[5], 0);
        }
    }

    /// The row `cache` holds for head `h` at `j` is `want`'s head `h`, position `n`.
    fn check(cache: &KvCache, h: usize, j: usize, want: &Tensor, n: usize) {
        let tolerance = match cache.kind {
            KvCacheType::F32 => 0.0,
            KvCacheType::F16 => 1e-3,
            KvCacheType::Q8_0 => 1e-2,
        };
        let want = want.narrow(1, h, 1).unwrap().narrow(2, n, 1).unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (which, value) in [("key", false), ("value", true)] {
            let got = stored(cache, h, j, value);
            for (a, b) in got.iter().zip(&want) {
                let kind = cache.kind;
                assert!(
                    (a - b).abs() <= tolerance,
                    "{kind:?} {which} {h} {j}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn forks_share_pages_until_one_writes() {
        let (heads, d) = (2, 16);
        let mut original = KvCache::new(KvCacheType::F32, heads, d, 4 * PAGE);
        let prompt = tensor(heads, 2 * PAGE + 22, d, 0.0);
        original.append(&prompt, &prompt).unwrap();
        // A fork of the first PAGE + PAGE / 2 tokens shares pages 0 and 1.
        let keep = PAGE + PAGE / 2;
        let mut fork = original.copy_prefix(keep, 4 * PAGE);
        let shared = |a: &KvCache, b: &KvCache, page: usize| {
            let (Store::F32(a), Store::F32(b)) = (&a.store, &b.store) else {
                unreachable!("f32 caches")
            };
            Arc::ptr_eq(&a.keys[page], &b.keys[page])
                && Arc::ptr_eq(&a.values[page], &b.values[page])
        };
        assert_eq!(fork.capacity(), 2 * PAGE);
        assert!(shared(&original, &fork, 0) && shared(&original, &fork, 1));
        // The fork writes other tokens after `keep`: it copies page 1 and leaves the
        // original's rows as they were; page 0 stays shared.
        let other = tensor(heads, 10, d, 5e3);
        fork.append(&other, &other).unwrap();
        for h in 0..heads {
            check(&fork, h, keep - 1, &prompt, keep - 1);
            check(&fork, h, keep + 5, &other, 5);
            check(&original, h, keep + 5, &prompt, keep + 5);
        }
        assert!(shared(&original, &fork, 0) && !shared(&original, &fork, 1));
        // The original, truncated and continued, writes into its own page 1 alone too.
        original.truncate(keep);
        original.append(&other, &other).unwrap();
        check(&original, 0, keep + 1, &other, 1);
        check(&fork, 0, keep + 1, &other, 1);
    }

    #[test]
    fn appends_read_strided_views() {
        // Values arrive as a transposed narrow of the fused QKV projection.
        let qkv = tensor(1, 3, 2 * 8, 0.0).squeeze(0).unwrap(); // (1, 3, 16): seq 3, 2 heads
        let v = qkv.reshape((1, 3, 2, 8)).unwrap().transpose(1, 2).unwrap();
        assert!(!v.is_contiguous());
        let mut cache = KvCache::new(KvCacheType::F32, 2, 8, 8);
        cache.append(&v, &v).unwrap();
        let want = v.contiguous().unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(stored(&cache, 1, 2, false), want[(3 + 2) * 8..(3 + 3) * 8]);
    }

    #[test]
    fn a_full_cache_refuses_more() {
        let mut cache = KvCache::new(KvCacheType::F16, 1, 8, 2);
        let three = tensor(1, 3, 8, 0.0);
        assert!(cache.append(&three, &three).is_err());
        assert_eq!(cache.len(), 0);
    }
}
