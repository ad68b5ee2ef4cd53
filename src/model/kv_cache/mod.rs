//! A key/value cache that grows with use, so a stream costs memory for the tokens it has
//! seen rather than for the whole context window up front, stored compactly: f16 by
//! default (half of f32's bytes; llama.cpp's default too), 8-bit blocks, or f32.

mod element;

use candle_core::{CpuStorage, Result, Storage, Tensor};

pub use element::{Element, F16, F32, Q8};

/// First allocation, in tokens (or the whole room if shorter); growth then doubles, up to
/// the context length, so a sequence copies O(log n) times however often it is continued
/// (a chat's next turn, through prefix reuse), and holds at most twice what it uses.
/// Small, because allocated memory is memory: the allocator zeroes buffers it reuses.
const FIRST_CAPACITY: usize = 256;

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

/// Keys and values of every head, in one format: head-major, `(kv_heads, capacity)` rows of
/// `E::units(head_dim)` units, so a head's rows are one contiguous run that attention streams.
pub struct Buffers<E: Element> {
    keys: Vec<E::Unit>,
    values: Vec<E::Unit>,
}

impl<E: Element> std::fmt::Debug for Buffers<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The sizes, not megabytes of numbers.
        write!(
            f,
            "Buffers({} + {} units)",
            self.keys.len(),
            self.values.len()
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
    data: &'a [E::Unit],
    /// Rows per head.
    capacity: usize,
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
        let at = (h * self.capacity + j) * units;
        &self.data[at..at + units]
    }
}

#[derive(Debug)]
pub struct KvCache {
    kind: KvCacheType,
    kv_heads: usize,
    head_dim: usize,
    store: Store,
    /// Rows allocated per head; rows past `len` are unused.
    capacity: usize,
    len: usize,
    /// The most tokens the current request may hold.
    max_len: usize,
    /// The most tokens a buffer is ever sized for (the context length).
    room: usize,
}

impl KvCache {
    pub fn new(
        kind: KvCacheType,
        kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        room: usize,
    ) -> Self {
        Self {
            kind,
            kv_heads,
            head_dim,
            store: Store::empty(kind),
            capacity: 0,
            len: 0,
            max_len,
            room: room.max(max_len),
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
        self.room = self.room.max(max_len);
    }

    /// A cache of its own holding a copy of the first `len` tokens, sized to them.
    pub fn copy_prefix(&self, len: usize, max_len: usize) -> Self {
        let len = len.min(self.len);
        let mut copy = Self {
            store: Store::empty(self.kind),
            capacity: 0,
            len: 0,
            max_len,
            room: self.room.max(max_len),
            ..*self
        };
        if len > 0 {
            copy.store = self
                .store
                .resized(self.kv_heads, self.capacity, len, len, self.head_dim);
            copy.capacity = len;
            copy.len = len;
        }
        copy
    }

    /// Tokens the buffers are sized for now.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes allocated for keys and values.
    pub fn bytes(&self) -> usize {
        2 * self.kv_heads * self.capacity * self.kind.row_bytes(self.head_dim)
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
        if needed > self.capacity {
            let capacity = needed
                .max(2 * self.capacity)
                .max(FIRST_CAPACITY)
                .min(self.room);
            self.store = self.store.resized(
                self.kv_heads,
                self.capacity,
                self.len,
                capacity,
                self.head_dim,
            );
            self.capacity = capacity;
        }
        let (kv_heads, capacity, len, d) = (self.kv_heads, self.capacity, self.len, self.head_dim);
        let place = Placement {
            kv_heads,
            capacity,
            len,
            seq,
            d,
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
            let rows = |data| HeadRows {
                data,
                capacity: c.capacity,
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

/// Where an append's rows go.
struct Placement {
    kv_heads: usize,
    capacity: usize,
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

    /// The first `len` rows of each head in buffers of `capacity` rows.
    fn resized(&self, heads: usize, old: usize, len: usize, capacity: usize, d: usize) -> Self {
        match self {
            Self::F32(b) => Self::F32(b.resized(heads, old, len, capacity, d)),
            Self::F16(b) => Self::F16(b.resized(heads, old, len, capacity, d)),
            Self::Q8(b) => Self::Q8(b.resized(heads, old, len, capacity, d)),
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

    fn resized(&self, heads: usize, old: usize, len: usize, capacity: usize, d: usize) -> Self {
        let units = E::units(d);
        let copy = |from: &[E::Unit]| {
            // Zeroed (the allocator's fresh pages for u8/u16/f32); only held rows are copied.
            let mut to = vec![E::Unit::default(); heads * capacity * units];
            for h in 0..heads {
                let rows = len * units;
                to[h * capacity * units..][..rows]
                    .copy_from_slice(&from[h * old * units..][..rows]);
            }
            to
        };
        Self {
            keys: copy(&self.keys),
            values: copy(&self.values),
        }
    }

    fn write(&mut self, at: &Placement, k: &Tensor, v: &Tensor) -> Result<()> {
        for (buffer, tensor) in [(&mut self.keys, k), (&mut self.values, v)] {
            let (storage, layout) = tensor.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
                candle_core::bail!("KV cache: keys and values must be f32 on the CPU")
            };
            let &[_, sh, sn, sd] = layout.stride() else {
                candle_core::bail!("KV cache: keys and values must have 4 dimensions")
            };
            let start = layout.start_offset();
            let units = E::units(at.d);
            let mut row = vec![0f32; at.d];
            for h in 0..at.kv_heads {
                for n in 0..at.seq {
                    let first = start + h * sh + n * sn;
                    for (c, x) in row.iter_mut().enumerate() {
                        *x = data[first + c * sd];
                    }
                    let to = (h * at.capacity + at.len + n) * units;
                    E::encode(&row, &mut buffer[to..to + units]);
                }
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

    fn key(cache: &KvCache, h: usize, j: usize) -> Vec<f32> {
        let mut out = vec![0f32; cache.head_dim];
        match cache.rows() {
            Rows::F32(k, _) => F32::decode(k.row(h, j), &mut out),
            Rows::F16(k, _) => F16::decode(k.row(h, j), &mut out),
            Rows::Q8(k, _) => Q8::decode(k.row(h, j), &mut out),
        }
        out
    }

    #[test]
    fn appends_grow_and_keep_every_row() {
        for kind in KvCacheType::ALL {
            let (heads, d) = (2, 40);
            let mut cache = KvCache::new(kind, heads, d, 600, 600);
            // A prompt, then decode steps past the first capacity (a growth copies rows).
            let first = tensor(heads, 250, d, 0.0);
            cache.append(&first, &first).unwrap();
            let steps: Vec<Tensor> = (0..10)
                .map(|i| tensor(heads, 1, d, 1e4 + i as f32))
                .collect();
            for step in &steps {
                cache.append(step, step).unwrap();
            }
            assert_eq!((cache.len(), cache.capacity()), (260, 512), "{kind:?}");
            assert_eq!(cache.bytes(), 2 * heads * 512 * kind.row_bytes(d));
            let tolerance = match kind {
                KvCacheType::F32 => 0.0,
                KvCacheType::F16 => 1e-3,
                KvCacheType::Q8_0 => 1e-2,
            };
            let check = |cache: &KvCache, h: usize, j: usize, want: &Tensor, n: usize| {
                let want = want.narrow(1, h, 1).unwrap().narrow(2, n, 1).unwrap();
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (a, b) in key(cache, h, j).iter().zip(&want) {
                    assert!((a - b).abs() <= tolerance, "{kind:?} {h} {j}: {a} vs {b}");
                }
            };
            for h in 0..heads {
                check(&cache, h, 7, &first, 7);
                check(&cache, h, 255, &steps[5], 0);
            }
            let copy = cache.copy_prefix(256, 600);
            assert_eq!((copy.len(), copy.capacity()), (256, 256));
            check(&copy, 1, 249, &first, 249);
            check(&copy, 1, 255, &steps[5], 0);
        }
    }

    #[test]
    fn appends_read_strided_views() {
        // Values arrive as a transposed narrow of the fused QKV projection.
        let qkv = tensor(1, 3, 2 * 8, 0.0).squeeze(0).unwrap(); // (1, 3, 16): seq 3, 2 heads
        let v = qkv.reshape((1, 3, 2, 8)).unwrap().transpose(1, 2).unwrap();
        assert!(!v.is_contiguous());
        let mut cache = KvCache::new(KvCacheType::F32, 2, 8, 8, 8);
        cache.append(&v, &v).unwrap();
        let want = v.contiguous().unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(key(&cache, 1, 2), want[(3 + 2) * 8..(3 + 3) * 8]);
    }

    #[test]
    fn a_full_cache_refuses_more() {
        let mut cache = KvCache::new(KvCacheType::F16, 1, 8, 2, 2);
        let three = tensor(1, 3, 8, 0.0);
        assert!(cache.append(&three, &three).is_err());
        assert_eq!(cache.len(), 0);
    }
}
