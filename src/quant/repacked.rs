//! K-quant and Q4_0 rows repacked eight to a block (`BlockQ4Kx8`, `BlockQ5Kx8`,
//! `BlockQ6Kx8`, `BlockQ4_0x8`), as llama.cpp's `Q4_K_8x8` and `Q4_0_8x8` and ik_llama.cpp's
//! `_R8` types are. In the file's layout each
//! weight block is one row's, so a kernel broadcasts the weights a few values at a time, one
//! vector per activation row; here the same four positions of eight rows fill one 256-bit
//! vector, the activations are the broadcast (a load), and every weight vector serves every
//! activation row (`x86::repacked`). Built at load (`LoadOptions::repack_weights`, on by
//! default), after which the file's pages of those matrices are released: memory stays at
//! the file's size.

use half::f16;
use rayon::prelude::*;

use std::ops::Range;

use super::blocks::{scales_and_mins, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, QK_K};
use super::kquant::TILE_ACTS;
use super::legacy::{BlockQ4_0, QK};
use super::OutPtr;

/// Weight rows in a repacked block.
pub const ROWS: usize = 8;

/// A block column of eight rows, repacked from the file's blocks.
pub trait RepackedBlock: Copy + Send + Sync {
    /// The file's block type.
    type Source: Sync;
    /// The same block column of eight rows: the same values, scales and factors.
    fn of(rows: [&Self::Source; ROWS]) -> Self;
}

/// A repacked K-quant block: what each activation block contributes to its offsets' term,
/// paired as the block's kernel meets it.
pub trait SubBlockSums: RepackedBlock {
    type Sums: Copy + Send + Sync;
    fn sums(y: &BlockQ8K) -> Self::Sums;
}

/// Q4_K: sub-blocks 2p and 2p+1 share chunk p of the packed values (low and high nibbles),
/// as in the file; `qs[p][c]` holds bytes 4c..4c+4 of each row's chunk p, row r in bytes
/// 4r..4r+4. `scales[p]` and `mins[p]`: sub-blocks 2p and 2p+1 of each row, row r in bytes
/// 2r and 2r+1, so that widened to i16 they are the i32 lane r's pair. 1,184 bytes for
/// 8 × 144 in the file: 2.8% more to read.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct BlockQ4Kx8 {
    pub qs: [[[u8; 32]; 8]; 4],
    pub scales: [[u8; 16]; 4],
    pub mins: [[u8; 16]; 4],
    pub d: [f16; ROWS],
    pub dmin: [f16; ROWS],
}

/// Q5_K: Q4_K's layout for the low four bits, scales, minimums and factors (`low4`), and
/// each value's fifth bit: `qh[c]` holds bytes 4c..4c+4 of each row's `qh`, row r in bytes
/// 4r..4r+4 (bit 2p of a byte: chunk p's low value, bit 2p+1 its high one, as in the file).
/// 1,440 bytes for 8 × 176: 2.3% more.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
pub struct BlockQ5Kx8 {
    pub low4: BlockQ4Kx8,
    pub qh: [[u8; 32]; 8],
}

/// Q6_K, re-encoded as Q4_K's chunks: values 64p + 4c + j (low nibble of `ql[p][c]`'s byte
/// 4r + j) and 64p + 32 + 4c + j (high nibble), their top two bits in `qh[p / 2][c]`'s
/// same byte (bits 4(p % 2) and 4(p % 2) + 2: the file's `qh` bytes as they are).
/// `scales[p][k]`: sub-blocks 4p + k and 4p + 2 + k of row r in bytes 2r and 2r+1 (the
/// values a chain of four runs meets: low nibbles and high). 1,680 bytes, as 8 × 210.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct BlockQ6Kx8 {
    pub ql: [[[u8; 32]; 8]; 4],
    pub qh: [[[u8; 32]; 8]; 2],
    pub scales: [[[i8; 16]; 2]; 4],
    pub d: [f16; ROWS],
}

/// Q4_0: `qs[c]` holds bytes 4c..4c+4 of each row's packed nibbles, row r in bytes
/// 4r..4r+4 (low nibbles: values 4c..4c+4, high: 16 + 4c..), and `d` each row's scale. 144
/// bytes, as 8 × 18.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct BlockQ4_0x8 {
    pub qs: [[u8; 32]; QK / 8],
    pub d: [f16; ROWS],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0x8>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ4Kx8>() == 1184);
const _: () = assert!(std::mem::size_of::<BlockQ5Kx8>() == 1440);
const _: () = assert!(std::mem::size_of::<BlockQ6Kx8>() == 1680);

impl BlockQ4Kx8 {
    /// Eight rows' factors, packed scales and minimums, and packed nibbles (Q4_K's, or
    /// Q5_K's low four bits), laid out as the type says.
    fn of_parts(rows: [(f16, f16, &[u8; 12], &[u8; QK_K / 2]); ROWS]) -> Self {
        let mut block = BlockQ4Kx8 {
            qs: [[[0; 32]; 8]; 4],
            scales: [[0; 16]; 4],
            mins: [[0; 16]; 4],
            d: rows.map(|row| row.0),
            dmin: rows.map(|row| row.1),
        };
        for (r, (_, _, packed, row_qs)) in rows.iter().enumerate() {
            let (row_scales, row_mins) = scales_and_mins(packed);
            for p in 0..4 {
                let pair = 2 * p..2 * p + 2;
                block.scales[p][2 * r..2 * r + 2].copy_from_slice(&row_scales[pair.clone()]);
                block.mins[p][2 * r..2 * r + 2].copy_from_slice(&row_mins[pair]);
                for c in 0..8 {
                    let bytes = &row_qs[32 * p + 4 * c..][..4];
                    block.qs[p][c][4 * r..4 * r + 4].copy_from_slice(bytes);
                }
            }
        }
        block
    }
}

/// Q4_K's and Q5_K's activation sums: sub-blocks 2p and 2p+1's (32 values each, so at most
/// 4,096 in magnitude) as the low and high i16 of lane p, as the repacked minimums' pairs
/// meet them in one `madd`.
fn paired_sub_block_sums(y: &BlockQ8K) -> [i32; 4] {
    let sum = |s: usize| y.bsums[2 * s] + y.bsums[2 * s + 1];
    std::array::from_fn(|p| i16_pair(sum(2 * p), sum(2 * p + 1)))
}

fn i16_pair(lo: i16, hi: i16) -> i32 {
    (u32::from(lo as u16) | (u32::from(hi as u16) << 16)) as i32
}

impl RepackedBlock for BlockQ4Kx8 {
    type Source = BlockQ4K;

    fn of(rows: [&BlockQ4K; ROWS]) -> Self {
        BlockQ4Kx8::of_parts(rows.map(|row| (row.d, row.dmin, &row.scales, &row.qs)))
    }
}

impl SubBlockSums for BlockQ4Kx8 {
    type Sums = [i32; 4];

    fn sums(y: &BlockQ8K) -> [i32; 4] {
        paired_sub_block_sums(y)
    }
}

impl RepackedBlock for BlockQ5Kx8 {
    type Source = BlockQ5K;

    fn of(rows: [&BlockQ5K; ROWS]) -> Self {
        let mut qh = [[0; 32]; 8];
        for (r, row) in rows.iter().enumerate() {
            for (c, bits) in qh.iter_mut().enumerate() {
                bits[4 * r..4 * r + 4].copy_from_slice(&row.qh[4 * c..4 * c + 4]);
            }
        }
        BlockQ5Kx8 {
            low4: BlockQ4Kx8::of_parts(rows.map(|row| (row.d, row.dmin, &row.scales, &row.qs))),
            qh,
        }
    }
}

impl SubBlockSums for BlockQ5Kx8 {
    type Sums = [i32; 4];

    fn sums(y: &BlockQ8K) -> [i32; 4] {
        paired_sub_block_sums(y)
    }
}

/// Four bytes at `at` as a little-endian word.
fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

impl RepackedBlock for BlockQ6Kx8 {
    type Source = BlockQ6K;

    /// In the file, half h (values 128h..128h + 128) keeps its four runs of 32 in `ql`'s
    /// bytes 64h..64h + 32 (low nibbles: run 0, high: run 2) and 64h + 32.. (runs 1 and 3),
    /// and their top bits in `qh`'s bytes 32h.. (bits 2·run). Chunk p = 2h + e is runs 2e
    /// and 2e + 1: their low four bits are one nibble each of those two bytes, and their top
    /// bits the `qh` byte's nibble e, kept in place. So each four values move as a word.
    fn of(rows: [&BlockQ6K; ROWS]) -> Self {
        let mut block = BlockQ6Kx8 {
            ql: [[[0; 32]; 8]; 4],
            qh: [[[0; 32]; 8]; 2],
            scales: [[[0; 16]; 2]; 4],
            d: rows.map(|row| row.d),
        };
        const LOW: u32 = 0x0f0f_0f0f;
        for (r, row) in rows.iter().enumerate() {
            for p in 0..4 {
                let (h, e) = (p / 2, p % 2);
                for k in 0..2 {
                    block.scales[p][k][2 * r] = row.scales[4 * p + k];
                    block.scales[p][k][2 * r + 1] = row.scales[4 * p + 2 + k];
                }
                for c in 0..8 {
                    let first = word(&row.ql, 64 * h + 4 * c);
                    let second = word(&row.ql, 64 * h + 32 + 4 * c);
                    let packed = if e == 0 {
                        (first & LOW) | ((second & LOW) << 4)
                    } else {
                        ((first >> 4) & LOW) | (second & !LOW)
                    };
                    block.ql[p][c][4 * r..4 * r + 4].copy_from_slice(&packed.to_le_bytes());
                }
            }
            for h in 0..2 {
                for c in 0..8 {
                    let bits = &row.qh[32 * h + 4 * c..][..4];
                    block.qh[h][c][4 * r..4 * r + 4].copy_from_slice(bits);
                }
            }
        }
        block
    }
}

impl SubBlockSums for BlockQ6Kx8 {
    type Sums = [i32; 8];

    /// Lane 2p + k: the 16-value sums of sub-blocks 4p + k and 4p + 2 + k.
    fn sums(y: &BlockQ8K) -> [i32; 8] {
        std::array::from_fn(|lane| {
            let (p, k) = (lane / 2, lane % 2);
            i16_pair(y.bsums[4 * p + k], y.bsums[4 * p + 2 + k])
        })
    }
}

impl RepackedBlock for BlockQ4_0x8 {
    type Source = BlockQ4_0;

    fn of(rows: [&BlockQ4_0; ROWS]) -> Self {
        let mut qs = [[0; 32]; QK / 8];
        for (r, row) in rows.iter().enumerate() {
            for (c, bytes) in qs.iter_mut().enumerate() {
                bytes[4 * r..4 * r + 4].copy_from_slice(&row.qs[4 * c..4 * c + 4]);
            }
        }
        BlockQ4_0x8 {
            qs,
            d: rows.map(|row| row.d),
        }
    }
}

/// A matrix's rows, eight to a block: group g (rows 8g..8g+8) is `blocks_per_row` blocks
/// from `blocks_per_row * g`.
pub struct Repacked<T> {
    blocks: Vec<T>,
    blocks_per_row: usize,
}

impl<T> std::fmt::Debug for Repacked<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Repacked({} blocks of 8 rows)", self.blocks.len())
    }
}

impl<T: RepackedBlock> Repacked<T> {
    /// `rows` (a multiple of `ROWS`) of `blocks_per_row` blocks each, repacked; `None` if
    /// the rows are not a multiple of eight or the memory cannot be had.
    pub fn new(rows: &[T::Source], blocks_per_row: usize) -> Option<Self> {
        let groups = rows.len().checked_div(blocks_per_row * ROWS)?;
        if groups * ROWS * blocks_per_row != rows.len() {
            return None;
        }
        let mut blocks = Vec::new();
        blocks.try_reserve_exact(rows.len() / ROWS).ok()?;
        // Written in place, each block once: no zeroing first.
        blocks.par_extend((0..rows.len() / ROWS).into_par_iter().map(|i| {
            let (g, b) = (i / blocks_per_row, i % blocks_per_row);
            let first = g * ROWS * blocks_per_row + b;
            T::of(std::array::from_fn(|r| &rows[first + r * blocks_per_row]))
        }));
        ask_for_huge_pages(&mut blocks);
        Some(Self {
            blocks,
            blocks_per_row,
        })
    }

    pub fn groups(&self) -> usize {
        self.blocks.len() / self.blocks_per_row.max(1)
    }

    /// Rows 8g..8g+8, block column after block column.
    pub fn group(&self, g: usize) -> &[T] {
        &self.blocks[g * self.blocks_per_row..(g + 1) * self.blocks_per_row]
    }

    /// Bytes held beside the mapped file.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.blocks.as_slice())
    }

    /// The (m, rows) products with `m` activation rows, where `kernel(blocks, tile, out)`
    /// puts group `blocks`' eight rows times activation rows `tile` in `out` (one array per
    /// activation row). Tasks take runs of groups (each group's blocks one stretch of
    /// memory); within a task a tile of activation rows at a time meets all its groups, so
    /// that the tile stays in L2 while the weights stream past.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub fn products(
        &self,
        m: usize,
        kernel: impl Fn(&[T], Range<usize>, &mut [[f32; ROWS]]) + Sync,
    ) -> Vec<f32> {
        let groups = self.groups();
        let rows = groups * ROWS;
        let mut out = vec![0f32; m * rows];
        let out_ptr = OutPtr(out.as_mut_ptr());
        let per_task = groups.div_ceil(rayon::current_num_threads() * 4).max(1);
        (0..groups.div_ceil(per_task))
            .into_par_iter()
            .for_each(|task| {
                let task_groups = task * per_task..((task + 1) * per_task).min(groups);
                let mut tile_out = [[0f32; ROWS]; TILE_ACTS];
                for first_act in (0..m).step_by(TILE_ACTS) {
                    let tile = first_act..(first_act + TILE_ACTS).min(m);
                    let tile_out = &mut tile_out[..tile.len()];
                    for g in task_groups.clone() {
                        kernel(self.group(g), tile.clone(), tile_out);
                        for (i, sums) in tile.clone().zip(tile_out.iter()) {
                            // SAFETY: rows 8g..8g+8 of output row i, within `out`; each
                            // group is one task's, so no two tasks write one element.
                            unsafe {
                                let at = out_ptr.at(i * rows + g * ROWS);
                                std::ptr::copy_nonoverlapping(sums.as_ptr(), at, ROWS)
                            };
                        }
                    }
                }
            });
        out
    }
}

/// Asks that `blocks`, once written, be moved to transparent huge pages in the background
/// (the kernel's `khugepaged`, where the system runs it): fewer TLB misses while decoding
/// streams through them, in a process that lives a while. Asked before writing, the pages
/// came huge at once, but the 2 MiB blocks a virtual machine's guest then hands out are
/// those it has reported free to its host, which faults them back in: on a 2-vCPU Zen 4 VM,
/// loading the 8-layer Q4_K_M file (627 MiB repacked) took 0.27-1.30 s against 0.35-0.49
/// with the hint after (fresh processes, alternating with llama.cpp's). Decoding right
/// after the load, huge pages gained 2-8%. A hint; nothing changes where it is refused.
fn ask_for_huge_pages<T>(blocks: &mut Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = blocks.as_mut_ptr() as usize;
        let end = start + blocks.capacity() * std::mem::size_of::<T>();
        let (first, last) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if first < last {
            // SAFETY: whole huge pages inside the allocation; the hint keeps their contents.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests;
