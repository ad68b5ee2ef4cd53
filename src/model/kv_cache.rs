//! A key/value cache that grows with use, so a stream costs memory for the tokens it has
//! seen rather than for the whole context window up front.

use candle_core::{Result, Tensor};

/// First allocation, in tokens (or the whole room if shorter); growth then doubles, up to
/// the context length, so a sequence copies O(log n) times however often it is continued
/// (a chat's next turn, through prefix reuse), and holds at most twice what it uses.
/// Small, because allocated memory is memory: the allocator zeroes buffers it reuses.
const FIRST_CAPACITY: usize = 256;

#[derive(Debug)]
pub struct KvCache {
    /// (batch, kv_heads, capacity, head_dim) buffers; rows past `len` are unused.
    buffers: Option<(Tensor, Tensor)>,
    len: usize,
    /// The most tokens the current request may hold.
    max_len: usize,
    /// The most tokens a buffer is ever sized for (the context length).
    room: usize,
}

impl KvCache {
    pub fn new(max_len: usize, room: usize) -> Self {
        Self {
            buffers: None,
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
    }

    /// A cache of its own holding a copy of the first `len` tokens (the buffers of a clone
    /// are shared, and appending writes into them).
    pub fn copy_prefix(&self, len: usize, max_len: usize) -> Result<Self> {
        let room = self.room.max(max_len);
        let len = len.min(self.len);
        let buffers = match &self.buffers {
            Some((k, v)) if len > 0 => Some((own_rows(k, len)?, own_rows(v, len)?)),
            _ => None,
        };
        Ok(Self {
            buffers,
            len,
            max_len,
            room,
        })
    }

    pub fn capacity(&self) -> usize {
        self.buffers
            .as_ref()
            .and_then(|(k, _)| k.dim(2).ok())
            .unwrap_or(0)
    }

    /// Appends `k` and `v` of shape (batch, kv_heads, seq, head_dim) and returns views of
    /// every cached key and value so far.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let seq_len = k.dim(2)?;
        let needed = self.len + seq_len;
        if needed > self.max_len {
            candle_core::bail!(
                "the KV cache holds at most {} tokens, {needed} were asked for",
                self.max_len
            )
        }
        if needed > self.capacity() {
            self.grow(k, v, needed)?;
        }
        let (k_buf, v_buf) = match &self.buffers {
            Some(buffers) => buffers,
            None => candle_core::bail!("KV cache buffers missing after growth"),
        };
        k_buf.slice_set(&k.contiguous()?, 2, self.len)?;
        v_buf.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((k_buf.narrow(2, 0, needed)?, v_buf.narrow(2, 0, needed)?))
    }

    fn grow(&mut self, k: &Tensor, v: &Tensor, needed: usize) -> Result<()> {
        let capacity = needed
            .max(2 * self.capacity())
            .max(FIRST_CAPACITY)
            .min(self.room);
        let (b, h, _, d) = k.dims4()?;
        let new_k = Tensor::zeros((b, h, capacity, d), k.dtype(), k.device())?;
        let new_v = Tensor::zeros((b, h, capacity, v.dim(3)?), v.dtype(), v.device())?;
        if let Some((old_k, old_v)) = &self.buffers {
            new_k.slice_set(&old_k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            new_v.slice_set(&old_v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
        }
        self.buffers = Some((new_k, new_v));
        Ok(())
    }
}

/// The first `len` positions of a (batch, heads, capacity, head_dim) buffer in storage of
/// their own, sized to them: `copy` alone would clone the whole buffer behind the view.
fn own_rows(buffer: &Tensor, len: usize) -> Result<Tensor> {
    let rows = buffer.narrow(2, 0, len)?;
    if rows.is_contiguous() {
        // The view is the whole buffer, or one head's leading rows: a copy of the storage
        // is then no larger than needed (or the buffer's single head).
        rows.copy()
    } else {
        rows.contiguous()
    }
}
