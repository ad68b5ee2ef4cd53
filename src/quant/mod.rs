//! Matrix products on the GGUF's own blocks, read in place from the memory-mapped file: no
//! second copy of the weights. K-quants (Q2_K to Q6_K) here, the 32-value types (Q8_0, Q4_0,
//! Q4_1, Q5_0, Q5_1) in `legacy/`, F32/F16/BF16 in `float.rs`; Q4_K, Q5_K, Q6_K and Q4_0
//! repacked eight rows to a block at load, in place of their pages of the file
//! (`repacked.rs`).
//!
//! Candle's kernels remain the path for what else Candle loads (Q8_K matrices, shapes ours
//! do not take) and for CPUs (or builds) without ours; `CANDLE_PHI_KERNELS=candle` selects
//! them everywhere, for comparison.

mod blocks;
mod float;
mod kquant;
mod legacy;
mod repacked;
mod scalar;
mod storage;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

pub use float::{FloatFormat, FloatMatrix};
pub use kquant::QMatrix;
pub use legacy::LegacyMatrix;
pub use storage::{RawTensor, WeightBytes};

/// Which matrix kernels the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Ours, AVX2 with AVX-VNNI (chosen at run time, so one portable build runs the best
    /// a CPU has).
    AvxVnni,
    /// The same, with AVX-512 VNNI's encoding of `vpdpbusd` (no AVX-VNNI needed); prompts'
    /// tiles in 512-bit registers, float matrices in 16 lanes.
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
            // Where a CPU has both encodings, EVEX's: its 32 registers let one unpacking of
            // a weight block serve 64 activation rows (VEX: 32), 9-17% more per prompt tile.
            if x86::has_avx512_vnni() {
                kernels.push(Kernels::Avx512Vnni);
            }
            if x86::has_avx_vnni() {
                kernels.push(Kernels::AvxVnni);
            }
            if x86::has_avx2() {
                kernels.push(Kernels::Avx2);
            }
        }
        kernels.extend([Kernels::Candle, Kernels::Scalar]);
        kernels
    }
}

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

/// The (rows, cols) of `tensor` where our `kernels` may read it unchecked: kernels this
/// CPU runs (others would be undefined behaviour, not just slow), a matrix of whole blocks
/// of `block` values and `block_bytes` bytes a row, exactly its bytes (`RawTensor` holds
/// them; checked again because the kernels read without bounds checks), aligned to
/// `align`. `None` otherwise: Candle's kernels take it.
fn readable(
    tensor: &RawTensor,
    kernels: Kernels,
    block: usize,
    block_bytes: usize,
    align: usize,
) -> Option<(usize, usize)> {
    let &[rows, cols] = tensor.dims() else {
        return None;
    };
    let bytes = tensor.bytes().as_bytes();
    let runnable = kernels != Kernels::Candle && Kernels::available().contains(&kernels);
    let sized = cols.is_multiple_of(block)
        && rows
            .checked_mul(cols / block)
            .and_then(|n| n.checked_mul(block_bytes))
            == Some(bytes.len());
    let aligned = (bytes.as_ptr() as usize).is_multiple_of(align);
    (runnable && sized && aligned).then_some((rows, cols))
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
    /// Candle's, for what ours do not cover (Q8_K, shapes ours do not take) or where asked.
    Candle(QMatMul, GgmlDType),
}

impl Linear {
    /// `repack`: a Q4_K, Q5_K, Q6_K or Q4_0 matrix is repacked (`QMatrix::repack`,
    /// `LegacyMatrix::repack`).
    pub fn new(tensor: &RawTensor, kernels: Kernels, repack: bool) -> Result<Self> {
        if let Some(matrix) = QMatrix::new(tensor, kernels) {
            return Ok(Linear::KQuant(if repack {
                matrix.repack()
            } else {
                matrix
            }));
        }
        if let Some(matrix) = FloatMatrix::new(tensor, kernels) {
            return Ok(Linear::Float(matrix));
        }
        if let Some(matrix) = LegacyMatrix::new(tensor, kernels) {
            return Ok(Linear::Legacy(if repack {
                matrix.repack()
            } else {
                matrix
            }));
        }
        let dtype = tensor.dtype();
        Ok(Linear::Candle(
            QMatMul::from_qtensor(tensor.to_qtensor()?)?,
            dtype,
        ))
    }

    /// Bytes of its weights repacked (`QMatrix::repack`), beside the file's.
    pub fn repacked_bytes(&self) -> usize {
        match self {
            Linear::KQuant(matrix) => matrix.repacked_bytes(),
            Linear::Legacy(matrix) => matrix.repacked_bytes(),
            _ => 0,
        }
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
