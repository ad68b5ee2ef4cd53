//! Products on K-quant rows repacked eight to a block (`repacked.rs`; each type's unpacking
//! in `repacked/blocks.rs`): a weight vector holds four positions of eight rows, one i32
//! lane per row, and meets each activation row's same four values broadcast (with EVEX,
//! folded into `vpdpbusd` as `{1to8}`). So the values are unpacked once per vector for all
//! activation rows, and a sub-block's scale applies to eight rows in one multiply, where
//! the file's layout broadcasts the weights, one vector per activation row (`k_groups.rs`).
//! Each lane takes its row's exact integer totals and then the same float steps as every
//! other kernel (`scale_block`): the same bits as the file's layout gives.
//!
//! Per pass of a 4096×3072 matrix, one thread, Zen 4, the matrix in L3, alternating, best of
//! 15 (ms), file's layout -> repacked, for 1 / 4 / 8 / 64 activation rows:
//!
//! | type | AVX-512 VNNI | AVX2 |
//! | --- | --- | --- |
//! | Q4_K | 0.35 / 0.92 / 1.06 / 5.71 -> 0.16 / 0.40 / 0.62 / 5.03 | 0.37 / 0.79 / 1.34 / 8.23 -> 0.18 / 0.48 / 1.03 / 7.43 |
//! | Q5_K | 0.44 / 0.80 / 1.29 / 5.77 -> 0.31 / 0.41 / 0.82 / 6.63 | 0.50 / 0.93 / 1.46 / 7.51 -> 0.36 / 0.67 / 1.26 / 8.02 |
//! | Q6_K | 0.39 / 0.93 / 1.45 / 6.35 -> 0.44 / 0.71 / 1.04 / 7.36 | 0.43 / 1.11 / 1.49 / 8.43 -> 0.44 / 0.92 / 1.41 / 9.27 |
//!
//! From memory, as decoding reads a model, the repacked rows are one sequential stream and
//! gain more (`PREFETCH_AHEAD`). Prompts' Q5_K and Q6_K tiles lost 7-16%: their values take
//! four to five operations per vector to unpack, where the file's tiles unpack a block once
//! for 64 rows. They now unpack once per tile too (`BUFFERED_WITH_EVEX`): 64 rows, AVX-512
//! VNNI, the file's layout against repacked, Q5_K 5.89 against 6.21 ms and Q6_K 6.28 against
//! 6.67 (a loss of 5-6%).

use std::arch::x86_64::*;

mod blocks;
mod q4_0;

pub use q4_0::{repacked_q4_0_avx2, repacked_q4_0_avx512_vnni, repacked_q4_0_avx_vnni, Q8_0Row};

use super::super::blocks::BlockQ8K;
use super::super::kquant::TILE_ACTS;
use super::super::repacked::{SubBlockSums, ROWS};
use super::group_dot::{chain_ends, chain_span, Evex, GroupDot, Vex};
use super::k_groups::broadcast;
use super::{prefetch_lines, Avx2};

/// Activation rows one pass over a group's weights serves: each takes three registers (two
/// chains and its total), so four leave room for the weights with VEX's 16; EVEX's 32 take
/// eight. AVX-512 VNNI, 8 / 16 / 64 rows of a 4096×3072 Q4_K matrix: 0.72 / 1.54 / 5.75 ms
/// by four, 0.65 / 1.27 / 5.09 by eight.
const STREAMS: usize = 4;
const EVEX_STREAMS: usize = 8;

/// How far ahead of the block in use the weights are asked for, into L2: a task's groups
/// follow one another in memory, one stream, which the hardware prefetchers follow only
/// within a page. Zen 4, one decoding stream of the 8-layer Q4_K_M file, against the file's
/// layout (39-41 tokens/s in the same runs): none 30, 4 blocks ahead into L1 31, 16 KiB
/// ahead into L2 42-50, 32 KiB 43-56, 64 KiB 42-49, both 4 blocks and 32 KiB 34-39.
const PREFETCH_AHEAD: usize = 32 << 10;

/// Asks for the lines of a block `PREFETCH_AHEAD` bytes past `x` (a hint: an address past
/// the allocation does not fault, and nothing is read through the pointer).
#[inline(always)]
unsafe fn prefetch_ahead<T>(x: &T) {
    let at = (x as *const T as *const i8).wrapping_add(PREFETCH_AHEAD);
    prefetch_lines::<T, _MM_HINT_T1>(at);
}

/// `out[i]` = the eight rows of `blocks` times `ys[i]` (whose sums are `sums[i]`,
/// `SubBlockSums::sums`), with AVX2.
///
/// Safety: the CPU has AVX2, FMA and F16C (`has_avx2`); every `ys[i]` and `sums[i]` holds
/// at least `blocks.len()` blocks; `out` is as long as `ys`, at most `TILE_ACTS` rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn repacked_avx2<T: RepackedKernel>(
    blocks: &[T],
    ys: &[&[BlockQ8K]],
    sums: &[&[T::Sums]],
    out: &mut [[f32; ROWS]],
) {
    streams::<Avx2, T>(blocks, ys, sums, out)
}

/// As `repacked_avx2`, with AVX-VNNI.
///
/// Safety: as for `repacked_avx2`, on a CPU with `has_avx_vnni`.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn repacked_avx_vnni<T: RepackedKernel>(
    blocks: &[T],
    ys: &[&[BlockQ8K]],
    sums: &[&[T::Sums]],
    out: &mut [[f32; ROWS]],
) {
    streams::<Vex, T>(blocks, ys, sums, out)
}

/// As `repacked_avx2`, with AVX-512 VNNI's encoding.
///
/// Safety: as for `repacked_avx2`, on a CPU with `has_avx512_vnni`.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub unsafe fn repacked_avx512_vnni<T: RepackedKernel>(
    blocks: &[T],
    ys: &[&[BlockQ8K]],
    sums: &[&[T::Sums]],
    out: &mut [[f32; ROWS]],
) {
    streams::<Evex, T>(blocks, ys, sums, out)
}

#[inline(always)]
unsafe fn streams<V: GroupDot, T: RepackedKernel>(
    blocks: &[T],
    ys: &[&[BlockQ8K]],
    sums: &[&[T::Sums]],
    out: &mut [[f32; ROWS]],
) {
    debug_assert!(ys.len() == sums.len() && ys.len() == out.len() && ys.len() <= TILE_ACTS);
    debug_assert!(ys.iter().all(|y| y.len() >= blocks.len()));
    debug_assert!(sums.iter().all(|s| s.len() >= blocks.len()));
    let per_pass = if V::GROUPS >= 8 {
        EVEX_STREAMS
    } else {
        STREAMS
    };
    if ys.len() > per_pass && (per_pass < EVEX_STREAMS || T::BUFFERED_WITH_EVEX) {
        return unpacked_once::<V, T>(blocks, ys, sums, per_pass, out);
    }
    let mut first = 0;
    while first < ys.len() {
        let n = (ys.len() - first).min(per_pass);
        let (ys, sums, out) = (&ys[first..], &sums[first..], &mut out[first..]);
        match n {
            8 => pass::<V, T, 8>(blocks, ys, sums, out),
            7 => pass::<V, T, 7>(blocks, ys, sums, out),
            6 => pass::<V, T, 6>(blocks, ys, sums, out),
            5 => pass::<V, T, 5>(blocks, ys, sums, out),
            4 => pass::<V, T, 4>(blocks, ys, sums, out),
            3 => pass::<V, T, 3>(blocks, ys, sums, out),
            2 => pass::<V, T, 2>(blocks, ys, sums, out),
            _ => pass::<V, T, 1>(blocks, ys, sums, out),
        }
        first += n;
    }
}

/// The first R activation rows over all of `blocks`, each block's values unpacked in
/// registers.
#[inline(always)]
unsafe fn pass<V: GroupDot, T: RepackedKernel, const R: usize>(
    blocks: &[T],
    ys: &[&[BlockQ8K]],
    sums: &[&[T::Sums]],
    out: &mut [[f32; ROWS]],
) {
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, x) in blocks.iter().enumerate() {
        prefetch_ahead(x);
        let y: [&BlockQ8K; R] = std::array::from_fn(|i| ys.get_unchecked(i).get_unchecked(b));
        let s: [&T::Sums; R] = std::array::from_fn(|i| sums.get_unchecked(i).get_unchecked(b));
        x.finish(totals::<V, _, R>(&x.runs::<V>(), y), y, s, &mut acc);
    }
    for i in 0..R {
        _mm256_storeu_ps(out[i].as_mut_ptr(), acc[i]);
    }
}

/// More activation rows than a pass of 16 registers takes (AVX2, AVX-VNNI): each block's
/// values unpacked once, into L1 (`Buffered`), for all the passes over it, where unpacking
/// per pass took longer than the loads. AVX2, a 4096×3072 matrix, 64 rows: Q4_K 8.2 -> 7.5
/// ms, Q5_K 10.8 -> 8.5, Q6_K 13.7 -> 9.2. With AVX-512's eight rows a pass, only for the
/// types whose unpacking costs more than a load (`BUFFERED_WITH_EVEX`): Q5_K 6.63 -> 6.21,
/// Q6_K 7.36 -> 6.67, but Q4_K 5.21 -> 5.92.
#[inline(always)]
unsafe fn unpacked_once<V: GroupDot, T: RepackedKernel>(
    blocks: &[T],
    ys: &[&[BlockQ8K]],
    sums: &[&[T::Sums]],
    per_pass: usize,
    out: &mut [[f32; ROWS]],
) {
    let mut acc = [_mm256_setzero_ps(); TILE_ACTS];
    for (b, x) in blocks.iter().enumerate() {
        prefetch_ahead(x);
        let runs = Buffered::of(&x.runs::<V>());
        let mut first = 0;
        while first < ys.len() {
            let n = (ys.len() - first).min(per_pass);
            macro_rules! pass {
                ($r:literal) => {{
                    let y: [&BlockQ8K; $r] =
                        std::array::from_fn(|i| ys.get_unchecked(first + i).get_unchecked(b));
                    let s: [&T::Sums; $r] =
                        std::array::from_fn(|i| sums.get_unchecked(first + i).get_unchecked(b));
                    let acc = &mut *(acc.as_mut_ptr().add(first) as *mut [__m256; $r]);
                    x.finish(totals::<V, _, $r>(&runs, y), y, s, acc)
                }};
            }
            match n {
                8 => pass!(8),
                7 => pass!(7),
                6 => pass!(6),
                5 => pass!(5),
                4 => pass!(4),
                3 => pass!(3),
                2 => pass!(2),
                _ => pass!(1),
            }
            first += n;
        }
    }
    for (out, acc) in out.iter_mut().zip(acc) {
        _mm256_storeu_ps(out.as_mut_ptr(), acc);
    }
}

/// A repacked block type the kernels here multiply.
pub trait RepackedKernel: SubBlockSums {
    /// Whether tiles of more rows than a pass unpack each block once (`Buffered`) with
    /// EVEX's eight rows a pass too: where unpacking a vector takes more than loading it.
    const BUFFERED_WITH_EVEX: bool;
    type Runs<'a>: Runs
    where
        Self: 'a;
    /// Its values, as `V`'s steps take them.
    unsafe fn runs<V: GroupDot>(&self) -> Self::Runs<'_>;
    /// `acc[i]` (lane r: row r) += `total[i]` (lane r: row r's exact Σ scale·q·y over the
    /// block) scaled, less the offsets' term.
    unsafe fn finish<const R: usize>(
        &self,
        total: [__m256i; R],
        ys: [&BlockQ8K; R],
        sums: [&Self::Sums; R],
        acc: &mut [__m256; R],
    );
}

/// How a repacked block's values unpack: `runs(p, c)` is values 64p + 4c..64p + 4c + 4
/// (low) and 64p + 32 + 4c.. (high) of each row, a byte each, the high ones 16 times too
/// large where `high_times_16`; chunk p's run c meets the scales `scale_pair(p, c / (8 /
/// SPLITS))`: low and high chains of 8 / SPLITS runs each.
pub trait Runs {
    const MAX_VALUE: i32;
    const SPLITS: usize;
    fn high_times_16(&self) -> bool {
        false
    }
    unsafe fn runs(&self, p: usize, c: usize) -> (__m256i, __m256i);
    unsafe fn scale_pair(&self, p: usize, k: usize) -> __m256i;
}

/// A block's runs and scales unpacked into a buffer (2.3 KiB, in L1), each then a load.
#[repr(C, align(32))]
struct Buffered<W> {
    runs: [[__m256i; 2]; 32],
    scale_pairs: [[__m256i; 2]; 4],
    high_times_16: bool,
    source: std::marker::PhantomData<W>,
}

impl<W: Runs> Buffered<W> {
    #[inline(always)]
    unsafe fn of(runs: &W) -> Self {
        let mut buffered = Buffered {
            runs: [[_mm256_setzero_si256(); 2]; 32],
            scale_pairs: [[_mm256_setzero_si256(); 2]; 4],
            high_times_16: runs.high_times_16(),
            source: std::marker::PhantomData,
        };
        for p in 0..4 {
            for c in 0..8 {
                let (lo, hi) = runs.runs(p, c);
                buffered.runs[8 * p + c] = [lo, hi];
            }
            for k in 0..W::SPLITS {
                buffered.scale_pairs[p][k] = runs.scale_pair(p, k);
            }
        }
        buffered
    }
}

impl<W: Runs> Runs for Buffered<W> {
    const MAX_VALUE: i32 = W::MAX_VALUE;
    const SPLITS: usize = W::SPLITS;
    #[inline(always)]
    fn high_times_16(&self) -> bool {
        self.high_times_16
    }
    #[inline(always)]
    unsafe fn runs(&self, p: usize, c: usize) -> (__m256i, __m256i) {
        let [lo, hi] = &self.runs[8 * p + c];
        (_mm256_load_si256(lo), _mm256_load_si256(hi))
    }
    #[inline(always)]
    unsafe fn scale_pair(&self, p: usize, k: usize) -> __m256i {
        _mm256_load_si256(&self.scale_pairs[p][k])
    }
}

/// Every row's exact Σ scale·q·y over the block, lane r: row r, for each activation row.
#[inline(always)]
unsafe fn totals<V: GroupDot, W: Runs, const R: usize>(x: &W, ys: [&BlockQ8K; R]) -> [__m256i; R] {
    let span = chain_span::<V>(W::MAX_VALUE);
    let runs = 8 / W::SPLITS;
    let mut total = [_mm256_setzero_si256(); R];
    for p in 0..4 {
        for k in 0..W::SPLITS {
            let mut lo = [_mm256_setzero_si256(); R];
            let mut hi = [_mm256_setzero_si256(); R];
            let pair = x.scale_pair(p, k);
            for step in 0..runs {
                let c = k * runs + step;
                let (wl, wh) = x.runs(p, c);
                for i in 0..R {
                    let q = ys[i].qs.as_ptr().add(64 * p + 4 * c) as *const u8;
                    lo[i] = V::step(lo[i], wl, broadcast::<4>(q));
                    hi[i] = V::step(hi[i], wh, broadcast::<4>(q.add(32)));
                }
                if chain_ends(step, runs, span) {
                    if x.high_times_16() {
                        // Exact: every product of the chain is a multiple of 16.
                        for h in &mut hi {
                            *h = _mm256_srai_epi32::<4>(*h);
                        }
                    }
                    V::add_scaled::<R>(&mut total, &lo, &hi, pair, false);
                    lo = [_mm256_setzero_si256(); R];
                    hi = [_mm256_setzero_si256(); R];
                }
            }
        }
    }
    total
}
