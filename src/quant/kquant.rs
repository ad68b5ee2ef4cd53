//! K-quant matrices (Q2_K to Q6_K): the file's 256-value blocks (or their rows repacked
//! eight to a block, `repacked.rs`) times activations quantized to Q8_K, in tiles of weight
//! rows and activation rows, with the kernels this CPU runs (x86/ for AVX2 and VNNI,
//! scalar.rs elsewhere).

use std::ops::{Range, RangeInclusive};

use rayon::prelude::*;

use super::blocks::WeightBlock;
use super::blocks::{as_blocks, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K};
use super::blocks::{quantize_q8k, BlockQ8K, QK_K};
use super::blocks::{BlockQ8Kx16, BlockQ8Kx4, BlockQ8Kx8};
use super::repacked::{BlockQ4Kx8, BlockQ5Kx8, BlockQ6Kx8, Repacked, RepackedBlock};
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{readable, scalar, Kernels, OutPtr, RawTensor, WeightBytes};
use candle_core::quantized::GgmlDType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockType {
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl BlockType {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q2K => Some(BlockType::Q2K),
            GgmlDType::Q3K => Some(BlockType::Q3K),
            GgmlDType::Q4K => Some(BlockType::Q4K),
            GgmlDType::Q5K => Some(BlockType::Q5K),
            GgmlDType::Q6K => Some(BlockType::Q6K),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            BlockType::Q2K => BlockQ2K::BYTES,
            BlockType::Q3K => BlockQ3K::BYTES,
            BlockType::Q4K => BlockQ4K::BYTES,
            BlockType::Q5K => BlockQ5K::BYTES,
            BlockType::Q6K => BlockQ6K::BYTES,
        }
    }

    /// Whether three or four rows left go as a group of four (`FOURS`), rather than
    /// eight weight rows at a time (`x86::tile`'s decoding path): so for the types with
    /// sub-blocks of 32. Per pass of an 8192×3072 matrix, AVX-512 VNNI on a Xeon, three /
    /// four rows: Q4_K 0.89-0.95 / 0.86-0.94 ms grouped against 0.89-0.92 / 0.97-1.03 by
    /// eight rows; Q6_K 1.47-1.53 / 1.34-1.43 against 0.93-0.99 / 1.08-1.09.
    fn groups_of_four(self) -> bool {
        matches!(self, BlockType::Q4K | BlockType::Q5K)
    }
}

/// Weight rows in a tile.
pub(super) const TILE_ROWS: usize = 8;
/// Rows left beyond the groups of sixteen or eight that the grouped kernels take as a group
/// of four (for the types `BlockType::groups_of_four` names); more go as a padded group. Measured
/// per pass of a Phi-3-mini-shaped 8192×3072 Q4_K matrix on a Xeon with AVX-VNNI, before
/// decoding took eight weight rows at a time: rows by AVX2 1 0.60 ms, 2 0.80, 3 ~1.0; a
/// group of four 1.01 ms (1.29 for Q6_K); two groups of four 1.74 ms; a group of eight
/// 1.47 ms.
const FOURS: RangeInclusive<usize> = 3..=4;
/// Activation rows from which AVX-512 VNNI's kernels take groups of sixteen (`x86::wide`):
/// two groups at least. Per pass of an 8192×3072 matrix on a Xeon, against groups of eight:
/// Q4_K 64 rows 7.4 -> 5.7 ms, Q5_K 7.2 -> 6.0, Q6_K 8.3 -> 6.6; 16 rows 2.3 ms both ways;
/// a lone group of sixteen for 5 to 8 rows 2.2-2.6 ms against 1.5-1.8 for one of eight.
const WIDE_FROM: usize = 32;
/// Activation rows in a tile: 64 × 292 bytes of one block column (308 interleaved by
/// sixteen) fit L1 beside the rest, and make eight interleaved groups of eight, which one
/// unpacking of a weight block serves with EVEX's 32 registers (VEX: two runs of four), or
/// four groups of sixteen (`x86::wide`). Per pass of an 8192×3072 matrix, 64 rows, AVX-512
/// VNNI on a Xeon, groups of eight: Q4_K 7.4 -> 6.2 ms, Q5_K 7.3 -> 6.3, Q6_K 8.4 -> 7.5
/// against 32.
pub(super) const TILE_ACTS: usize = 64;

/// A tile's activation rows as the grouped x86 kernels take them: its groups of sixteen
/// (rows `16g..16g+16` in `sixteens[g]`, AVX-512 VNNI's 512-bit kernels) or of eight
/// (`eights`, 256-bit kernels: VNNI or AVX2), the last maybe padded with zeros past the
/// tile's rows, then a group of four (`fours`, likewise). Rows in none go row by row.
#[derive(Clone, Copy)]
pub(super) struct Groups<'a> {
    pub(super) sixteens: &'a [&'a [BlockQ8Kx16]],
    pub(super) eights: &'a [&'a [BlockQ8Kx8]],
    pub(super) fours: &'a [&'a [BlockQ8Kx4]],
}

/// The activation rows of a pass interleaved for the grouped kernels (see `Groups`), block
/// column after block column.
#[derive(Default)]
struct Interleaved {
    sixteens: Vec<BlockQ8Kx16>,
    eights: Vec<BlockQ8Kx8>,
    fours: Vec<BlockQ8Kx4>,
}

/// A block type every kernel of this build handles.
#[cfg(target_arch = "x86_64")]
trait KernelBlock: WeightBlock + scalar::ScalarBlock + x86::GroupBlock {}
#[cfg(target_arch = "x86_64")]
impl<T: WeightBlock + scalar::ScalarBlock + x86::GroupBlock> KernelBlock for T {}
#[cfg(not(target_arch = "x86_64"))]
trait KernelBlock: WeightBlock + scalar::ScalarBlock {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: WeightBlock + scalar::ScalarBlock> KernelBlock for T {}

/// A (rows, cols) K-quant weight matrix, multiplied as `x · Wᵀ`.
#[derive(Debug)]
pub struct QMatrix {
    bytes: WeightBytes,
    block_type: BlockType,
    rows: usize,
    cols: usize,
    kernels: Kernels,
    /// Its rows eight to a block (`repacked`), where asked: then every product reads them,
    /// and none the file's.
    repacked: Option<RepackedRows>,
}

/// A matrix's rows repacked, by type.
#[derive(Debug)]
enum RepackedRows {
    Q4K(Repacked<BlockQ4Kx8>),
    Q5K(Repacked<BlockQ5Kx8>),
    Q6K(Repacked<BlockQ6Kx8>),
}

impl QMatrix {
    /// `None` when our kernels do not handle this tensor (type, shape or alignment).
    pub fn new(tensor: &RawTensor, kernels: Kernels) -> Option<Self> {
        let block_type = BlockType::of(tensor.dtype())?;
        let (rows, cols) = readable(tensor, kernels, QK_K, block_type.block_bytes(), 8)?;
        Some(Self {
            bytes: tensor.bytes().clone(),
            block_type,
            rows,
            cols,
            kernels,
            repacked: None,
        })
    }

    /// With its rows repacked eight to a block (`repacked`), if it is a Q4_K, Q5_K or Q6_K
    /// matrix of whole groups of eight rows, on x86 kernels, and the memory can be had
    /// (unchanged otherwise); the file's pages of it are then dropped from this process's
    /// memory (the copy takes their place: memory stays at the file's size), as no product
    /// reads them again.
    pub fn repack(mut self) -> Self {
        let x86 = matches!(
            self.kernels,
            Kernels::Avx2 | Kernels::AvxVnni | Kernels::Avx512Vnni
        );
        if !(x86 && cfg!(target_arch = "x86_64")) {
            return self;
        }
        let bytes = self.bytes.as_bytes();
        let blocks_per_row = self.cols / QK_K;
        fn rows<T: RepackedBlock>(bytes: &[u8], blocks_per_row: usize) -> Option<Repacked<T>>
        where
            T::Source: WeightBlock,
        {
            let blocks = as_blocks(bytes).expect("whole, aligned blocks (checked in new)");
            Repacked::new(blocks, blocks_per_row)
        }
        self.repacked = match self.block_type {
            BlockType::Q4K => rows(bytes, blocks_per_row).map(RepackedRows::Q4K),
            BlockType::Q5K => rows(bytes, blocks_per_row).map(RepackedRows::Q5K),
            BlockType::Q6K => rows(bytes, blocks_per_row).map(RepackedRows::Q6K),
            _ => None,
        };
        if self.repacked.is_some() {
            self.bytes.release();
        }
        self
    }

    /// The bytes its repacked rows hold beside the file's.
    pub fn repacked_bytes(&self) -> usize {
        match &self.repacked {
            Some(RepackedRows::Q4K(rows)) => rows.bytes(),
            Some(RepackedRows::Q5K(rows)) => rows.bytes(),
            Some(RepackedRows::Q6K(rows)) => rows.bytes(),
            None => 0,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `x` is (m, cols) row-major; returns (m, rows).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let blocks_per_row = self.cols / QK_K;
        let mut acts = vec![BlockQ8K::ZERO; m * blocks_per_row];
        let kernels = self.kernels;
        acts.par_chunks_mut(blocks_per_row)
            .zip(x.par_chunks(self.cols))
            .for_each(|(a, x)| match kernels {
                // SAFETY: these kernels are only selected where the CPU has AVX2.
                #[cfg(target_arch = "x86_64")]
                Kernels::Avx2 | Kernels::AvxVnni | Kernels::Avx512Vnni => unsafe {
                    x86::quantize_q8k(x, a)
                },
                _ => quantize_q8k(x, a),
            });
        let acts: Vec<&[BlockQ8K]> = acts.chunks_exact(blocks_per_row).collect();
        #[cfg(target_arch = "x86_64")]
        match &self.repacked {
            Some(RepackedRows::Q4K(rows)) => return self.repacked_matmul(rows, &acts),
            Some(RepackedRows::Q5K(rows)) => return self.repacked_matmul(rows, &acts),
            Some(RepackedRows::Q6K(rows)) => return self.repacked_matmul(rows, &acts),
            None => {}
        }
        let interleaved = self.interleave(&acts, blocks_per_row);
        let sixteens: Vec<&[BlockQ8Kx16]> =
            interleaved.sixteens.chunks_exact(blocks_per_row).collect();
        let eights: Vec<&[BlockQ8Kx8]> = interleaved.eights.chunks_exact(blocks_per_row).collect();
        let fours: Vec<&[BlockQ8Kx4]> = interleaved.fours.chunks_exact(blocks_per_row).collect();

        // Tasks take runs of weight-row groups, so the weights stream from memory once per
        // tile of activation rows (once in decoding and in 64-token prompt chunks).
        let groups = self.rows.div_ceil(TILE_ROWS);
        let groups_per_task = groups.div_ceil(rayon::current_num_threads() * 4).max(1);
        let tasks = groups.div_ceil(groups_per_task);
        let mut out = vec![0f32; m * self.rows];
        let out_ptr = OutPtr(out.as_mut_ptr());
        (0..tasks).into_par_iter().for_each(|task| {
            let task_rows = task * groups_per_task * TILE_ROWS
                ..((task + 1) * groups_per_task * TILE_ROWS).min(self.rows);
            let mut tile_out = [0f32; TILE_ROWS * TILE_ACTS];
            // Activation tiles outside: one tile's rows stay in L2 while the task's weights
            // stream past them (prefetched a tile ahead). The other way round, every weight
            // tile read all the activations, which do not fit L2 in a pass of several
            // tiles: per row, 11-24% slower at 512 rows than at 64 (now the same).
            for first_act in (0..m).step_by(TILE_ACTS) {
                let tile_acts = &acts[first_act..(first_act + TILE_ACTS).min(m)];
                let n = tile_acts.len();
                // The groups of sixteen or eight among these rows (TILE_ACTS is a multiple
                // of both; the last tile's may be padded) and of four (in the last tile only).
                let of_tile = |groups: usize, rows: usize| {
                    let first = (first_act / rows).min(groups);
                    first..(first + n.div_ceil(rows)).min(groups)
                };
                let groups = Groups {
                    sixteens: &sixteens[of_tile(sixteens.len(), BlockQ8Kx16::ROWS)],
                    eights: &eights[of_tile(eights.len(), 8)],
                    fours: if first_act + n == m { &fours } else { &[] },
                };
                for first_row in task_rows.clone().step_by(TILE_ROWS) {
                    let rows = first_row..(first_row + TILE_ROWS).min(task_rows.end);
                    let tile_out = &mut tile_out[..rows.len() * n];
                    self.tile(rows.clone(), tile_acts, groups, tile_out);
                    // The tile is (weight rows, activation rows); the output (m, rows): it
                    // goes there transposed while it is in L1.
                    let dst = out_ptr.at(first_act * self.rows + first_row);
                    // SAFETY: the tile's corner in the output, which holds its n rows from
                    // there; each task writes only its own rows' columns, so no two tasks
                    // touch one element.
                    unsafe { self.scatter(tile_out, n, dst) };
                }
            }
        });
        out
    }

    /// `acts` · Wᵀ on the repacked rows (`Repacked::products`).
    #[cfg(target_arch = "x86_64")]
    fn repacked_matmul<T: x86::RepackedKernel>(
        &self,
        repacked: &Repacked<T>,
        acts: &[&[BlockQ8K]],
    ) -> Vec<f32> {
        // A few adds per block, for all rows in one buffer: no task of its own, no vector a row.
        let blocks_per_row = self.cols / QK_K;
        let sums: Vec<T::Sums> = acts
            .iter()
            .flat_map(|row| row.iter().map(T::sums))
            .collect();
        let sums: Vec<&[T::Sums]> = sums.chunks_exact(blocks_per_row).collect();
        let kernels = self.kernels;
        repacked.products(acts.len(), |blocks, tile, out| {
            let (acts, sums) = (&acts[tile.clone()], &sums[tile]);
            // SAFETY: only built where the CPU has these kernels (`repack`); every activation
            // row has the group's number of blocks; `out` is as long as the tile.
            unsafe {
                match kernels {
                    Kernels::Avx512Vnni => x86::repacked_avx512_vnni(blocks, acts, sums, out),
                    Kernels::AvxVnni => x86::repacked_avx_vnni(blocks, acts, sums, out),
                    _ => x86::repacked_avx2(blocks, acts, sums, out),
                }
            }
        })
    }

    /// `dst[i * rows + j] = tile[j * n + i]`: a tile's products into the (m, rows) output.
    ///
    /// Safety: `dst` is valid for those writes, and nothing else accesses them meanwhile.
    unsafe fn scatter(&self, tile: &[f32], n: usize, dst: *mut f32) {
        if n == 1 {
            // Decoding: one activation row, so the tile's column is a stretch of the output.
            std::ptr::copy_nonoverlapping(tile.as_ptr(), dst, tile.len());
            return;
        }
        match self.kernels {
            // SAFETY: AVX2 as the kernels (only selected where the CPU has it).
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 | Kernels::AvxVnni | Kernels::Avx512Vnni => {
                x86::transpose(tile, n, dst, self.rows)
            }
            _ => {
                for (j, values) in tile.chunks_exact(n).enumerate() {
                    for (i, &v) in values.iter().enumerate() {
                        *dst.add(i * self.rows + j) = v;
                    }
                }
            }
        }
    }

    /// The activations interleaved for the grouped kernels: in groups of sixteen rows
    /// (AVX-512 VNNI's kernels) or eight, then the rows left over: if more than `FOURS`
    /// holds, as a last group padded with zeros (a group costs the same however many of its
    /// rows are real); if `FOURS` holds their count (and the type takes groups of four), as
    /// a group of four; else they go through `x86::tile` (eight weight rows at a
    /// time). AVX2 takes the groups of eight for every prompt (its steps sum in 16-bit lanes;
    /// see `x86::k_groups`): per pass of an 8192×3072 matrix on the Xeon VM, 8 / 16 rows:
    /// Q4_K 1.96 / 3.78 -> 1.29 / 2.38 ms against the rows one by one; 5 rows (a padded
    /// group) 1.49 -> 1.26, but Q6_K 1.56 -> 1.69; 4 rows (a group of four) Q4_K 1.02 ->
    /// 0.84, Q5_K 1.17 -> 0.95 against eight weight rows at a time (3 rows: the same).
    fn interleave(&self, acts: &[&[BlockQ8K]], blocks_per_row: usize) -> Interleaved {
        let wide = match self.kernels {
            Kernels::Avx512Vnni => acts.len() >= WIDE_FROM,
            Kernels::AvxVnni | Kernels::Avx2 => false,
            _ => return Interleaved::default(),
        };
        let rows = if wide { BlockQ8Kx16::ROWS } else { 8 };
        let left = acts.len() % rows;
        let whole = acts.len() - left;
        let grouped = if left > *FOURS.end() {
            acts
        } else {
            &acts[..whole]
        };
        let fours = if FOURS.contains(&left) && self.block_type.groups_of_four() {
            &acts[whole..]
        } else {
            &[]
        };
        let fours = by_columns(fours, 4, blocks_per_row, BlockQ8Kx4::interleave);
        if wide {
            Interleaved {
                sixteens: by_columns(grouped, rows, blocks_per_row, BlockQ8Kx16::interleave),
                fours,
                ..Interleaved::default()
            }
        } else {
            Interleaved {
                eights: by_columns(grouped, rows, blocks_per_row, BlockQ8Kx8::interleave),
                fours,
                ..Interleaved::default()
            }
        }
    }

    /// `out[j * acts.len() + i]` = weight row `rows.start + j` · `acts[i]`; `groups` holds
    /// the first rows of `acts` interleaved, if the kernel takes them.
    fn tile(&self, rows: Range<usize>, acts: &[&[BlockQ8K]], groups: Groups, out: &mut [f32]) {
        match self.block_type {
            BlockType::Q2K => self.tile_of::<BlockQ2K>(rows, acts, groups, out),
            BlockType::Q3K => self.tile_of::<BlockQ3K>(rows, acts, groups, out),
            BlockType::Q4K => self.tile_of::<BlockQ4K>(rows, acts, groups, out),
            BlockType::Q5K => self.tile_of::<BlockQ5K>(rows, acts, groups, out),
            BlockType::Q6K => self.tile_of::<BlockQ6K>(rows, acts, groups, out),
        }
    }

    fn tile_of<B: KernelBlock>(
        &self,
        rows: Range<usize>,
        acts: &[&[BlockQ8K]],
        groups: Groups,
        out: &mut [f32],
    ) {
        let row_bytes = self.cols / QK_K * B::BYTES;
        let weights = &self.bytes.as_bytes()[rows.start * row_bytes..rows.end * row_bytes];
        let weights: &[B] =
            as_blocks(weights).expect("whole, aligned blocks (checked in QMatrix::new)");
        let mut w: [&[B]; TILE_ROWS] = [&[]; TILE_ROWS];
        for (slot, row) in w.iter_mut().zip(weights.chunks_exact(self.cols / QK_K)) {
            *slot = row;
        }
        let w = &w[..rows.len()];
        // Only the x86 kernels read the interleaved groups.
        #[cfg(not(target_arch = "x86_64"))]
        let _ = groups;
        match self.kernels {
            // SAFETY: these kernels are only selected where the CPU has them; all rows have
            // the same number of blocks; the tile is within TILE_ROWS × TILE_ACTS.
            #[cfg(target_arch = "x86_64")]
            Kernels::AvxVnni => unsafe { x86::tile_avx_vnni(w, acts, groups, out) },
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx512Vnni => unsafe { x86::tile_avx512_vnni(w, acts, groups, out) },
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 => unsafe { x86::tile_avx2(w, acts, groups, out) },
            _ => {
                for (j, row) in w.iter().enumerate() {
                    for (i, act) in acts.iter().enumerate() {
                        out[j * acts.len() + i] = scalar::dot(row, act);
                    }
                }
            }
        }
    }
}

/// `acts` in groups of `rows` interleaved by `group`, block column after block column.
fn by_columns<T>(
    acts: &[&[BlockQ8K]],
    rows: usize,
    blocks_per_row: usize,
    group: fn(&[&[BlockQ8K]], usize) -> T,
) -> Vec<T> {
    acts.chunks(rows)
        .flat_map(|rows| (0..blocks_per_row).map(move |b| group(rows, b)))
        .collect()
}
