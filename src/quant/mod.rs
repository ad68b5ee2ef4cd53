//! Matrix products on the GGUF's own blocks, read in place from the memory-mapped file: no
//! second copy of the weights, no repacking at first use. K-quants (Q4_K, Q5_K, Q6_K) here,
//! the 32-value types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) in `legacy/`, F32/F16/BF16 in `float.rs`.
//!
//! Candle's kernels remain the path for the other tensor types (Q2_K, Q3_K, ...) and for
//! CPUs (or builds) without ours; `CANDLE_PHI_KERNELS=candle` selects them everywhere, for
//! comparison.

mod blocks;
mod float;
mod legacy;
mod scalar;
mod storage;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use blocks::{as_blocks, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8Kx8, WeightBlock};
pub use blocks::{quantize_q8k, BlockQ8K, QK_K};
pub use float::{FloatFormat, FloatMatrix};
pub use legacy::LegacyMatrix;
pub use storage::{RawTensor, WeightBytes};

/// Which matrix kernels the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Ours, AVX2 with AVX-VNNI (chosen at run time, so one portable build runs the best
    /// a CPU has).
    AvxVnni,
    /// The same, with AVX-512 VNNI's encoding of `vpdpbusd` (no AVX-VNNI needed).
    Avx512Vnni,
    /// Ours, AVX2.
    Avx2,
    /// Ours, portable Rust.
    Scalar,
    /// Candle's `QMatMul` for every weight.
    Candle,
}

impl Kernels {
    const ALL: [Kernels; 5] = [
        Kernels::AvxVnni,
        Kernels::Avx512Vnni,
        Kernels::Avx2,
        Kernels::Scalar,
        Kernels::Candle,
    ];

    /// The name `CANDLE_PHI_KERNELS` takes.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::AvxVnni => "avx-vnni",
            Kernels::Avx512Vnni => "avx512-vnni",
            Kernels::Avx2 => "avx2",
            Kernels::Scalar => "scalar",
            Kernels::Candle => "candle",
        }
    }

    /// The best this CPU runs, unless `CANDLE_PHI_KERNELS` names others (an error if it
    /// names none, or ones this CPU cannot run), or `CANDLE_DEQUANTIZE_ALL` asks Candle to
    /// multiply in f32.
    pub fn selected() -> crate::Result<Kernels> {
        let available = Kernels::available();
        // Candle's switch to multiply with dequantized f32 weights applies to all.
        if std::env::var_os("CANDLE_DEQUANTIZE_ALL").is_some() {
            return Ok(Kernels::Candle);
        }
        let Some(requested) = std::env::var_os("CANDLE_PHI_KERNELS") else {
            return Ok(available[0]);
        };
        let requested = requested.to_string_lossy();
        let names = |kernels: &[Kernels]| {
            kernels
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let invalid = |expected: String| {
            crate::Error::invalid_argument("CANDLE_PHI_KERNELS", &requested, expected)
        };
        match Kernels::ALL.into_iter().find(|k| k.name() == requested) {
            Some(kernels) if available.contains(&kernels) => Ok(kernels),
            Some(_) => Err(invalid(format!(
                "This CPU cannot run those kernels; it runs {}. Unset it for the best of them",
                names(&available)
            ))),
            None => Err(invalid(format!(
                "It must be one of {}, or unset for the best this CPU runs",
                names(&Kernels::ALL)
            ))),
        }
    }

    /// What this CPU runs, best first. Where our SIMD kernels do not apply, Candle's own
    /// (NEON, ...) beat our portable ones, so those come before `Scalar`.
    pub fn available() -> Vec<Kernels> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx_vnni() {
                kernels.push(Kernels::AvxVnni);
            }
            if x86::has_avx512_vnni() {
                kernels.push(Kernels::Avx512Vnni);
            }
            if x86::has_avx2() {
                kernels.push(Kernels::Avx2);
            }
        }
        kernels.extend([Kernels::Candle, Kernels::Scalar]);
        kernels
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockType {
    Q4K,
    Q5K,
    Q6K,
}

impl BlockType {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4K => Some(BlockType::Q4K),
            GgmlDType::Q5K => Some(BlockType::Q5K),
            GgmlDType::Q6K => Some(BlockType::Q6K),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            BlockType::Q4K => BlockQ4K::BYTES,
            BlockType::Q5K => BlockQ5K::BYTES,
            BlockType::Q6K => BlockQ6K::BYTES,
        }
    }
}

/// Weight rows in a tile.
const TILE_ROWS: usize = 8;
/// Activation rows in a tile: 32 × 292 bytes of one block column fit L1 beside the rest
/// (and make four interleaved groups of eight).
const TILE_ACTS: usize = 32;

/// A block type every kernel of this build handles.
#[cfg(target_arch = "x86_64")]
trait KernelBlock: WeightBlock + scalar::ScalarBlock + x86::VnniBlock {}
#[cfg(target_arch = "x86_64")]
impl<T: WeightBlock + scalar::ScalarBlock + x86::VnniBlock> KernelBlock for T {}
#[cfg(not(target_arch = "x86_64"))]
trait KernelBlock: WeightBlock + scalar::ScalarBlock {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: WeightBlock + scalar::ScalarBlock> KernelBlock for T {}

/// The output buffer, written by several tasks at disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements, and the buffer outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not field access) so closures capture the whole Send + Sync wrapper.
    fn at(self, index: usize) -> *mut f32 {
        self.0.wrapping_add(index)
    }
}

/// A (rows, cols) K-quant weight matrix, multiplied as `x · Wᵀ`.
#[derive(Debug)]
pub struct QMatrix {
    bytes: WeightBytes,
    block_type: BlockType,
    rows: usize,
    cols: usize,
    kernels: Kernels,
}

impl QMatrix {
    /// `None` when our kernels do not handle this tensor (type, shape or alignment).
    pub fn new(tensor: &RawTensor, kernels: Kernels) -> Option<Self> {
        let block_type = BlockType::of(tensor.dtype())?;
        let &[rows, cols] = tensor.dims() else {
            return None;
        };
        let bytes = tensor.bytes();
        let aligned = (bytes.as_bytes().as_ptr() as usize).is_multiple_of(8);
        // `RawTensor` holds whole blocks for its shape; checked again because the kernels
        // read without bounds checks.
        let sized = cols % QK_K == 0
            && rows
                .checked_mul(cols / QK_K)
                .and_then(|n| n.checked_mul(block_type.block_bytes()))
                == Some(bytes.as_bytes().len());
        // Kernels this CPU lacks would be undefined behaviour, not just slow.
        let runnable = kernels != Kernels::Candle && Kernels::available().contains(&kernels);
        (runnable && aligned && sized).then(|| Self {
            bytes: bytes.clone(),
            block_type,
            rows,
            cols,
            kernels,
        })
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
        let interleaved = self.interleave(&acts, blocks_per_row);
        let act_groups: Vec<&[BlockQ8Kx8]> = interleaved.chunks_exact(blocks_per_row).collect();

        // Tasks take runs of weight-row groups, so the weights stream from memory once.
        let groups = self.rows.div_ceil(TILE_ROWS);
        let groups_per_task = groups.div_ceil(rayon::current_num_threads() * 4).max(1);
        let tasks = groups.div_ceil(groups_per_task);
        let mut out = vec![0f32; m * self.rows];
        let out_ptr = OutPtr(out.as_mut_ptr());
        (0..tasks).into_par_iter().for_each(|task| {
            let task_rows = task * groups_per_task * TILE_ROWS
                ..((task + 1) * groups_per_task * TILE_ROWS).min(self.rows);
            // Tiles write a (task rows, m) buffer contiguously, transposed afterwards into the
            // (m, rows) output in 8×8 blocks. With one activation row (decoding) the two
            // layouts are the same, and the buffer is this task's part of the output.
            let width = task_rows.len();
            let mut owned = Vec::new();
            let local: &mut [f32] = if m == 1 {
                // SAFETY: in bounds, and no other task touches these rows.
                unsafe { std::slice::from_raw_parts_mut(out_ptr.at(task_rows.start), width) }
            } else {
                owned.resize(width * m, 0f32);
                &mut owned
            };
            let mut tile_out = [0f32; TILE_ROWS * TILE_ACTS];
            for first_row in task_rows.clone().step_by(TILE_ROWS) {
                let rows = first_row..(first_row + TILE_ROWS).min(task_rows.end);
                let local_rows = &mut local[(first_row - task_rows.start) * m..][..rows.len() * m];
                for first_act in (0..m).step_by(TILE_ACTS) {
                    let tile_acts = &acts[first_act..(first_act + TILE_ACTS).min(m)];
                    let n = tile_acts.len();
                    // The whole groups of eight among these rows (TILE_ACTS is a multiple).
                    let first_group = (first_act / 8).min(act_groups.len());
                    let last_group = (first_group + n / 8).min(act_groups.len());
                    let tile_groups = &act_groups[first_group..last_group];
                    let tile_out = &mut tile_out[..rows.len() * n];
                    self.tile(rows.clone(), tile_acts, tile_groups, tile_out);
                    for (j, values) in tile_out.chunks_exact(n).enumerate() {
                        local_rows[j * m + first_act..][..n].copy_from_slice(values);
                    }
                }
            }
            if m == 1 {
                return;
            }
            let dst = out_ptr.at(task_rows.start);
            match self.kernels {
                // SAFETY: AVX2 as the kernels; the writes stay within this task's columns.
                #[cfg(target_arch = "x86_64")]
                Kernels::Avx2 | Kernels::AvxVnni | Kernels::Avx512Vnni => unsafe {
                    x86::transpose(local, m, dst, self.rows)
                },
                _ => {
                    for (j, values) in local.chunks_exact(m).enumerate() {
                        for (i, &v) in values.iter().enumerate() {
                            // SAFETY: in bounds, and each task writes only its own rows'
                            // columns, so no two tasks touch one element.
                            unsafe { *dst.add(i * self.rows + j) = v };
                        }
                    }
                }
            }
        });
        out
    }

    /// The activations in groups of eight rows, interleaved, for the VNNI kernels (whole
    /// groups only: a group padded with zero rows costs as much as a full one, more than
    /// four rows' AVX2 products; the rest go row by row).
    fn interleave(&self, acts: &[&[BlockQ8K]], blocks_per_row: usize) -> Vec<BlockQ8Kx8> {
        if !matches!(self.kernels, Kernels::AvxVnni | Kernels::Avx512Vnni) {
            return Vec::new();
        }
        acts.chunks_exact(8)
            .flat_map(|rows| {
                let rows: &[&[BlockQ8K]; 8] = rows.try_into().expect("chunks of eight");
                (0..blocks_per_row).map(move |b| BlockQ8Kx8::interleave(rows, b))
            })
            .collect()
    }

    /// `out[j * acts.len() + i]` = weight row `rows.start + j` · `acts[i]`; `groups` holds
    /// the first whole groups of eight of `acts` interleaved, if the kernel takes them.
    fn tile(
        &self,
        rows: Range<usize>,
        acts: &[&[BlockQ8K]],
        groups: &[&[BlockQ8Kx8]],
        out: &mut [f32],
    ) {
        match self.block_type {
            BlockType::Q4K => self.tile_of::<BlockQ4K>(rows, acts, groups, out),
            BlockType::Q5K => self.tile_of::<BlockQ5K>(rows, acts, groups, out),
            BlockType::Q6K => self.tile_of::<BlockQ6K>(rows, acts, groups, out),
        }
    }

    fn tile_of<B: KernelBlock>(
        &self,
        rows: Range<usize>,
        acts: &[&[BlockQ8K]],
        groups: &[&[BlockQ8Kx8]],
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
        // Only the x86 VNNI kernels read the interleaved groups.
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
            Kernels::Avx2 => unsafe { x86::tile_avx2(w, acts, out) },
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

/// Each matrix type as a Candle op on the activations.
macro_rules! matmul_op {
    ($($matrix:ty => $name:literal),*) => {$(
        impl CustomOp1 for $matrix {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
                let shape = (self.rows(), self.cols());
                product(self.name(), shape, storage, layout, |x, m| self.matmul(x, m))
            }
        }
    )*};
}

matmul_op!(
    QMatrix => "kquant-matmul",
    FloatMatrix => "float-matmul",
    LegacyMatrix => "legacy-quant-matmul"
);

/// Runs `f` on ranges of up to `group` rows covering `0..rows`, in parallel tasks that
/// each take a run of them (about four tasks per thread), so the weights stream once.
fn par_row_groups(rows: usize, group: usize, f: impl Fn(Range<usize>) + Sync) {
    let groups = rows.div_ceil(group);
    let per_task = groups.div_ceil(rayon::current_num_threads() * 4).max(1);
    let tasks = groups.div_ceil(per_task);
    (0..tasks).into_par_iter().for_each(|task| {
        let end = ((task + 1) * per_task * group).min(rows);
        for first in (task * per_task * group..end).step_by(group) {
            f(first..(first + group).min(end));
        }
    });
}

/// `x · Wᵀ` for a (rows, cols) matrix whose `matmul` takes (m, cols) activations: checks
/// the activations and shapes the (…, rows) result.
fn product(
    name: &str,
    (rows, cols): (usize, usize),
    storage: &CpuStorage,
    layout: &Layout,
    matmul: impl Fn(&[f32], usize) -> Vec<f32>,
) -> Result<(CpuStorage, Shape)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{name} takes f32 activations")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{name} takes contiguous activations")
    };
    let mut dims = layout.shape().dims().to_vec();
    if dims.last() != Some(&cols) {
        candle_core::bail!("{name}: activations {dims:?} against {cols} columns")
    }
    let x = &data[start..end];
    let out = matmul(x, x.len() / cols);
    *dims.last_mut().expect("checked above") = rows;
    Ok((CpuStorage::F32(out), Shape::from(dims)))
}

/// A weight matrix of the model: ours where our kernels apply, Candle's otherwise.
#[derive(Debug)]
pub enum Linear {
    KQuant(QMatrix),
    Float(FloatMatrix),
    Legacy(LegacyMatrix),
    /// Candle's, for the types ours do not cover (Q2_K, Q3_K, ...) or where asked for.
    Candle(QMatMul, GgmlDType),
}

impl Linear {
    pub fn new(tensor: &RawTensor, kernels: Kernels) -> Result<Self> {
        if let Some(matrix) = QMatrix::new(tensor, kernels) {
            return Ok(Linear::KQuant(matrix));
        }
        if let Some(matrix) = FloatMatrix::new(tensor, kernels) {
            return Ok(Linear::Float(matrix));
        }
        if let Some(matrix) = LegacyMatrix::new(tensor, kernels) {
            return Ok(Linear::Legacy(matrix));
        }
        let dtype = tensor.dtype();
        Ok(Linear::Candle(
            QMatMul::from_qtensor(tensor.to_qtensor()?)?,
            dtype,
        ))
    }

    /// The tensor type, where Candle's kernels multiply it.
    pub fn left_to_candle(&self) -> Option<GgmlDType> {
        match self {
            Linear::Candle(_, dtype) => Some(*dtype),
            _ => None,
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Linear::KQuant(matrix) => xs.contiguous()?.apply_op1_no_bwd(matrix),
            Linear::Float(matrix) => xs.contiguous()?.apply_op1_no_bwd(matrix),
            Linear::Legacy(matrix) => xs.contiguous()?.apply_op1_no_bwd(matrix),
            Linear::Candle(matmul, _) => matmul.forward(xs),
        }
    }
}

#[cfg(test)]
mod tests;
