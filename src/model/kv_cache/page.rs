//! One page of cached rows in an anonymous mapping of its own: the kernel hands out zeroed
//! memory as rows are first written and takes the whole page back when it is dropped.
//!
//! From the allocator, pages of a few hundred KiB landed in its arenas among the freed
//! temporaries of each pass (glibc serves sizes under its moving mmap threshold there):
//! measured 1.5x the cache's size in RSS at 4,000 tokens of Phi-3-mini's shapes.

use std::marker::PhantomData;

use memmap2::MmapMut;

/// A storage unit any bit pattern of which is a value (zeroed memory included).
///
/// # Safety
///
/// Implementors are plain integers or floats, aligned to at most 4 KiB.
pub unsafe trait Plain: Copy + Default + Send + Sync + 'static {}
// SAFETY: plain integers and floats.
unsafe impl Plain for u8 {}
unsafe impl Plain for u16 {}
unsafe impl Plain for f32 {}

pub struct Page<U: Plain> {
    map: MmapMut,
    units: usize,
    _unit: PhantomData<U>,
}

impl<U: Plain> Page<U> {
    /// `units` zeroed units.
    pub fn zeroed(units: usize) -> std::io::Result<Self> {
        // A mapping cannot be empty; a page is never asked for with no units.
        let map = MmapMut::map_anon((units * std::mem::size_of::<U>()).max(1))?;
        Ok(Self {
            map,
            units,
            _unit: PhantomData,
        })
    }

    /// A page of its own holding the first `kept` units of each run of `run` units (each
    /// head's rows written so far): copy on write of a shared page. The rest is not
    /// touched, so it costs no memory until written (a whole copy made the last page of
    /// every layer resident at each fork: 96 MiB a chat turn for Phi-3-mini).
    pub fn try_clone_runs(&self, run: usize, kept: usize) -> std::io::Result<Self> {
        let mut copy = Self::zeroed(self.units)?;
        for (to, from) in copy
            .units_mut()
            .chunks_mut(run)
            .zip(self.units().chunks(run))
        {
            to[..kept].copy_from_slice(&from[..kept]);
        }
        Ok(copy)
    }

    pub fn units(&self) -> &[U] {
        // SAFETY: the mapping is page-aligned and holds `units` units of a type valid for
        // any bits (`Plain`); it lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast(), self.units) }
    }

    pub fn units_mut(&mut self) -> &mut [U] {
        // SAFETY: as in `units`, and `&mut self` is the only access.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().cast(), self.units) }
    }
}
