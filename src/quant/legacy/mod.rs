//! Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 matrices (blocks of 32 values with an f16 scale, and a
//! minimum for Q4_1 and Q5_1: most community Phi-3 files, and the fallbacks of K-quant files
//! for rows that are not whole 256-value blocks), multiplied in place from the mapped file, or
//! for Q4_0 repacked eight rows to a block at load (`LegacyMatrix::repack`).
//! Activations are quantized to Q8_0 blocks as llama.cpp and Candle do, so products agree
//! with theirs up to the order of additions; the minimum's term takes each activation
//! block's sum in f32 (theirs rounds it to f16).

mod blocks;

use half::f16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
pub use blocks::BlockQ8_0x8;
pub use blocks::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, LegacyBlock, QK};

use super::blocks::{as_blocks, WeightBlock};
use super::repacked::{BlockQ4_0x8, Repacked};
use super::storage::RawTensor;
use super::{par_row_groups, readable, Kernels, OutPtr, WeightBytes};
use candle_core::quantized::GgmlDType;

/// Quantizes `xs` (a multiple of 32 long) to Q8_0 as ggml does: scale from the largest
/// magnitude, values rounded half away from zero.
pub fn quantize_q8_0(xs: &[f32], out: &mut [BlockQ8_0]) {
    for (x, block) in xs.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d);
        for (q, &v) in block.qs.iter_mut().zip(x) {
            *q = (v * inverse).round() as i8;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Legacy {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
}

/// Weight rows per group: what stays in L2 while every tile of activations passes (24 rows
/// of 8192 Q8_0 values are 209 KiB, a tile of 16 activation rows 139 KiB).
const GROUP_ROWS: usize = 24;

/// A (rows, cols) matrix of one of these types, multiplied as `x · Wᵀ`.
#[derive(Debug)]
pub struct LegacyMatrix {
    bytes: WeightBytes,
    kind: Legacy,
    rows: usize,
    cols: usize,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    kernels: Kernels,
    /// A Q4_0 matrix's rows eight to a block, where `repack` made them (the file's pages
    /// are then released and never read).
    repacked: Option<Repacked<BlockQ4_0x8>>,
}

impl LegacyMatrix {
    /// `None` for other tensor types, and where Candle's kernels are asked for.
    pub fn new(tensor: &RawTensor, kernels: Kernels) -> Option<Self> {
        let (kind, block_bytes) = match tensor.dtype() {
            GgmlDType::Q8_0 => (Legacy::Q8_0, BlockQ8_0::BYTES),
            GgmlDType::Q4_0 => (Legacy::Q4_0, BlockQ4_0::BYTES),
            GgmlDType::Q4_1 => (Legacy::Q4_1, BlockQ4_1::BYTES),
            GgmlDType::Q5_0 => (Legacy::Q5_0, BlockQ5_0::BYTES),
            GgmlDType::Q5_1 => (Legacy::Q5_1, BlockQ5_1::BYTES),
            _ => return None,
        };
        let (rows, cols) = readable(tensor, kernels, QK, block_bytes, 2)?;
        Some(Self {
            bytes: tensor.bytes().clone(),
            kind,
            rows,
            cols,
            kernels,
            repacked: None,
        })
    }

    /// With its rows repacked eight to a block, if it is a Q4_0 matrix of whole groups of
    /// eight rows, on x86 kernels, and the memory can be had (unchanged otherwise); the
    /// file's pages of it are then dropped from this process's memory, as for the K-quants
    /// (`QMatrix::repack`).
    pub fn repack(mut self) -> Self {
        let x86 = matches!(
            self.kernels,
            Kernels::Avx2 | Kernels::AvxVnni | Kernels::Avx512Vnni
        );
        if !(x86 && cfg!(target_arch = "x86_64") && self.kind == Legacy::Q4_0) {
            return self;
        }
        let blocks =
            as_blocks(self.bytes.as_bytes()).expect("whole, aligned blocks (checked in new)");
        self.repacked = Repacked::new(blocks, self.cols / QK);
        if self.repacked.is_some() {
            self.bytes.release();
        }
        self
    }

    /// The bytes its repacked rows hold beside the file's.
    pub fn repacked_bytes(&self) -> usize {
        self.repacked.as_ref().map_or(0, Repacked::bytes)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `x` is (m, cols) row-major; returns (m, rows).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        match self.kind {
            Legacy::Q8_0 => self.matmul_of::<BlockQ8_0>(x, m),
            Legacy::Q4_0 => self.matmul_of::<BlockQ4_0>(x, m),
            Legacy::Q4_1 => self.matmul_of::<BlockQ4_1>(x, m),
            Legacy::Q5_0 => self.matmul_of::<BlockQ5_0>(x, m),
            Legacy::Q5_1 => self.matmul_of::<BlockQ5_1>(x, m),
        }
    }

    fn matmul_of<B: LegacyBlock>(&self, x: &[f32], m: usize) -> Vec<f32> {
        let blocks = self.cols / QK;
        let mut acts = vec![
            BlockQ8_0 {
                d: f16::ZERO,
                qs: [0; QK]
            };
            m * blocks
        ];
        acts.par_chunks_mut(blocks)
            .zip(x.par_chunks(self.cols))
            .for_each(|(a, x)| self.quantize(x, a));
        let sums: Vec<f32> = match B::STORED_MIN {
            true => acts.iter().map(|a| a.d_sum(a.q_sum())).collect(),
            false => Vec::new(),
        };
        let offsets: Vec<i32> = match B::OFFSET {
            0 => Vec::new(),
            offset => acts.iter().map(|a| offset * a.q_sum()).collect(),
        };
        let scales: Vec<f32> = acts.iter().map(|a| a.d.to_f32()).collect();
        #[cfg(target_arch = "x86_64")]
        if let Some(repacked) = &self.repacked {
            return self.repacked_matmul(repacked, &acts, &scales, &offsets, m);
        }
        // Whole groups of eight rows, interleaved, where this CPU has a kernel for them.
        #[cfg(target_arch = "x86_64")]
        let interleaved = (m >= 8)
            .then(|| super::x86::interleaved::<B>(self.kernels))
            .flatten();
        #[cfg(target_arch = "x86_64")]
        let groups = match interleaved {
            Some(_) => interleave::<B>(&acts, blocks),
            None => Vec::new(),
        };
        let acts = Activations {
            blocks: &acts,
            scales: &scales,
            offsets: &offsets,
            sums: &sums,
            #[cfg(target_arch = "x86_64")]
            groups: interleaved.map(|kernel| (&groups[..], kernel)),
            #[cfg(not(target_arch = "x86_64"))]
            groups: std::marker::PhantomData,
        };
        let mut out = vec![0f32; m * self.rows];
        let out_ptr = OutPtr(out.as_mut_ptr());
        par_row_groups(self.rows, GROUP_ROWS, |rows| {
            self.group::<B>(rows, &acts, m, out_ptr)
        });
        out
    }

    /// `x` · Wᵀ on the repacked rows (`Repacked::products`).
    #[cfg(target_arch = "x86_64")]
    fn repacked_matmul(
        &self,
        repacked: &Repacked<BlockQ4_0x8>,
        acts: &[BlockQ8_0],
        scales: &[f32],
        offsets: &[i32],
        m: usize,
    ) -> Vec<f32> {
        use super::x86::{self, Q8_0Row};
        let blocks = self.cols / QK;
        let rows: Vec<Q8_0Row<'_>> = (0..m)
            .map(|i| {
                let row = i * blocks..(i + 1) * blocks;
                Q8_0Row {
                    blocks: &acts[row.clone()],
                    scales: &scales[row.clone()],
                    offsets: &offsets[row],
                }
            })
            .collect();
        let kernels = self.kernels;
        repacked.products(m, |blocks, tile, out| {
            let acts = &rows[tile];
            // SAFETY: only built where the CPU has these kernels (`repack`); every activation
            // row has the group's number of blocks, scales and offsets; `out` is as long as
            // the tile.
            unsafe {
                match kernels {
                    Kernels::Avx512Vnni => x86::repacked_q4_0_avx512_vnni(blocks, acts, out),
                    Kernels::AvxVnni => x86::repacked_q4_0_avx_vnni(blocks, acts, out),
                    _ => x86::repacked_q4_0_avx2(blocks, acts, out),
                }
            }
        })
    }

    /// One activation row as Q8_0 blocks, with this CPU's vector instructions where the
    /// kernels have them (the same blocks).
    fn quantize(&self, x: &[f32], out: &mut [BlockQ8_0]) {
        match self.kernels {
            // SAFETY: these kernel sets are only selected where the CPU has AVX2.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 | Kernels::AvxVnni | Kernels::Avx512Vnni => unsafe {
                super::x86::quantize_q8_0(x, out)
            },
            _ => quantize_q8_0(x, out),
        }
    }

    fn group<B: LegacyBlock>(
        &self,
        rows: std::ops::Range<usize>,
        acts: &Activations<'_, B>,
        m: usize,
        out: OutPtr,
    ) {
        let blocks = self.cols / QK;
        let row_bytes = blocks * B::BYTES;
        let bytes = &self.bytes.as_bytes()[rows.start * row_bytes..rows.end * row_bytes];
        let weights: &[B] = as_blocks(bytes).expect("whole, aligned blocks (checked in new)");
        debug_assert!(acts.scales.len() == acts.blocks.len());
        debug_assert!(B::OFFSET == 0 || acts.offsets.len() == acts.blocks.len());
        debug_assert!(!B::STORED_MIN || acts.sums.len() == acts.blocks.len());
        #[cfg(target_arch = "x86_64")]
        {
            use super::x86;
            // The first activation rows, eight at a time...
            let mut grouped = 0;
            if let Some((groups, kernel)) = acts.groups {
                grouped = groups.len() / blocks * 8;
                let group = x86::InterleavedGroup {
                    weights,
                    groups,
                    blocks,
                    out,
                    rows: rows.clone(),
                    stride: self.rows,
                };
                // SAFETY: as below; `x86::interleaved` offers a kernel only where the CPU
                // runs it and it takes B; the groups were built with B's excess.
                unsafe { kernel(&group) };
            }
            // ...and the rest row by row.
            let group = x86::LegacyGroup {
                weights,
                acts: &acts.blocks[grouped * blocks..],
                scales: &acts.scales[grouped * blocks..],
                offsets: acts.offsets.get(grouped * blocks..).unwrap_or_default(),
                sums: acts.sums.get(grouped * blocks..).unwrap_or_default(),
                blocks,
                m: m - grouped,
                out: OutPtr(out.at(grouped * self.rows)),
                rows: rows.clone(),
                stride: self.rows,
            };
            // SAFETY: `Kernels::available` offers each set only where the CPU has it (and
            // `Kernels::selected` only what it offers); the rows hold `blocks` blocks each,
            // the activations `m` rows of them, with a scale each (and an offset term or a
            // sum where B has an offset or a minimum); each task writes only its own rows'
            // outputs.
            match self.kernels {
                Kernels::AvxVnni => return unsafe { x86::legacy_group_avx_vnni(&group) },
                Kernels::Avx512Vnni => return unsafe { x86::legacy_group_avx512_vnni(&group) },
                Kernels::Avx2 => return unsafe { x86::legacy_group_avx2(&group) },
                Kernels::Scalar | Kernels::Candle => {}
            }
        }
        for (j, w) in weights.chunks_exact(blocks).enumerate() {
            for (i, a) in acts.blocks.chunks_exact(blocks).take(m).enumerate() {
                // SAFETY: in bounds; each task writes only its own rows' outputs.
                unsafe { *out.at(i * self.rows + rows.start + j) = dot(w, a) };
            }
        }
    }
}

/// The quantized activation rows; each block's d as f32, its offset term (the weights'
/// integer offset · Σ q) where the weights have one and its d · Σ q where they store a
/// minimum (else none); and the first rows' whole groups of eight interleaved, with the
/// kernel that takes them (or none). The kernels load the per-block terms ready-made
/// instead of converting and multiplying them per weight row.
struct Activations<'a, B> {
    blocks: &'a [BlockQ8_0],
    scales: &'a [f32],
    offsets: &'a [i32],
    sums: &'a [f32],
    #[cfg(target_arch = "x86_64")]
    groups: Option<(&'a [BlockQ8_0x8], super::x86::InterleavedKernel<B>)>,
    #[cfg(not(target_arch = "x86_64"))]
    groups: std::marker::PhantomData<B>,
}

/// The whole groups of eight rows of `acts` (`blocks` blocks a row), interleaved for B.
#[cfg(target_arch = "x86_64")]
fn interleave<B: LegacyBlock>(acts: &[BlockQ8_0], blocks: usize) -> Vec<BlockQ8_0x8> {
    let rows: Vec<&[BlockQ8_0]> = acts.chunks_exact(blocks).collect();
    rows.chunks_exact(8)
        .flat_map(|group| {
            (0..blocks).map(move |b| {
                BlockQ8_0x8::interleave(std::array::from_fn(|r| &group[r][b]), B::EXCESS)
            })
        })
        .collect()
}

/// One weight row · one activation row, portably, in the vector kernels' order: per block,
/// the exact integer sum (less the weights' integer offset) scaled in one fused step, then
/// the stored minimum's term.
pub fn dot<B: LegacyBlock>(w: &[B], a: &[BlockQ8_0]) -> f32 {
    w.iter().zip(a).fold(0f32, |acc, (w, a)| {
        let sum: i32 = w
            .values()
            .iter()
            .zip(&a.qs)
            .map(|(&x, &y)| i32::from(x) * i32::from(y))
            .sum();
        let q = a.q_sum();
        let total = sum + B::OFFSET * q;
        let acc = (total as f32).mul_add(w.d().to_f32() * a.d.to_f32(), acc);
        match B::STORED_MIN {
            true => w.m_bits().to_f32().mul_add(a.d_sum(q), acc),
            false => acc,
        }
    })
}
