//! F32, F16 and BF16 weight rows times f32 activation rows, with FMA (F16C converts f16, a
//! shift bf16), in AVX2's 8 lanes or AVX-512's 16. A microkernel of 3 weight rows (2 for one
//! decoding stream) × 4 activation rows (AVX2; with AVX-512's 32 registers, 6 × 4 for
//! prompts and 3 × 8 decoding) keeps its sums in registers beside the weight vectors and one
//! activation vector, so each converted weight vector serves four (eight) rows. A group's
//! weight rows (up to 48: 288 KiB of f16 at Phi-3-mini's 3072 columns) stay in L2 while
//! every tile of 8 activation rows passes; prompt tiles go up to 8,192 columns at a time
//! (`PASS_COLUMNS`).
//! Decoding (a few rows) streams each weight strip over all its columns (two weight rows
//! at a time for one stream, strips of three for a few), prefetched 16 KiB ahead into L2
//! (`STREAM_AHEAD`). A matrix takes one width for every pass (`FloatGroup::wide`), so a
//! row's sums are the same bits alone or in a batch.

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::float::FloatFormat;
use super::super::OutPtr;
use super::hsum;
use crate::lanes::{Avx2, Avx512, Lanes};

/// Activation rows per tile. Rows whose length is a multiple of 4 KiB (Phi-3's 3,072 and
/// 8,192 columns: 12 and 32 KiB) put every row's same column in the same L1 set, so a
/// tile's rows compete for that set's ways (8 on Zen, 12 on recent Intel cores): at 16
/// rows they evicted each other and the weights. Eight rows with twice the columns a pass,
/// per 64-row pass on the Xeon VM, AVX-512 / AVX2: 9216×3072 23.9 / 25.7 -> 18.6-19.2 /
/// 21.7-22.3 ms, 3072×8192 17.6 / 22.5 -> 15.0-15.5 / 20.6; the 8-layer F16 file's
/// prompts 0.82x -> 0.98-1.00x of llama.cpp's (AVX2: 0.93-0.97x -> 1.06-1.09x). Copying
/// the rows a line apart instead was slower for 8,192 columns (17.3 -> 20.5 ms).
const ACTS: usize = 8;
/// Weight rows per microkernel strip (`Tiles::PROMPT_STRIP` for prompts), and the most.
const STRIP: usize = 3;
const MAX_STRIP: usize = 6;
/// Columns per pass of a prompt tile: whole rows of Phi-3's matrices (3,072 and 8,192
/// columns), so each microkernel loads and stores its sums once. Passes short enough for the
/// tile's 8 rows of activations to stay in L1 (512 columns, 1,024 with AVX-512) had been
/// chosen on the Xeon VM, where 512 against 256 columns had already gained (an 8-layer F16
/// prompt of 512 tokens, 6.8-7.2 -> 6.6-6.7 s); on a 2-vCPU Zen 4, per 64-row pass of a
/// 9216×3072 F16 matrix, AVX-512 1,024 -> 8,192 columns 22.1-23.0 -> 19.1-19.2 ms (3072×8192:
/// 16.9-17.2 -> 15.7-15.9), AVX2 512 -> 8,192 25.7-26.1 -> 19.3 (19.5-19.9 -> 16.2).
const PASS_COLUMNS: usize = 8192;
/// Weight rows per strip for one activation row (one decoding stream), not three: it reads
/// two streams from memory, as llama.cpp's one row at a time nearly does, with two chains
/// of fused multiply-adds (one row alone waits on one chain: with AVX2's eight lanes,
/// 3.6 ms below). Per pass of an F16 matrix, 2 threads, on a
/// 2-vCPU Zen 4, strips of three -> one row -> two rows: AVX-512, 16384×3072 2.72-2.93 ->
/// 2.05-2.71 -> 1.59-1.69 ms, 3072×8192 1.48-1.52 -> 1.00-1.55 -> 1.22-1.31; AVX2,
/// 16384×3072 1.69-2.58 -> 3.58-3.61 -> 2.01-2.15, 3072×8192 1.38-1.73 -> 1.80-1.83 ->
/// 1.31-1.34. Two activation rows in strips of two gained nothing.
const ONE_STREAM_STRIP: usize = 2;
/// The hardware prefetchers stop at page boundaries; see `STREAM_AHEAD`.
const PREFETCH_AHEAD: usize = super::STREAM_AHEAD;

/// How a format's values become f32, eight or sixteen at a time.
trait Format {
    const BYTES: usize;
    unsafe fn load8(row: *const u8, k: usize) -> __m256;
    unsafe fn load16(row: *const u8, k: usize) -> __m512;
}

struct F32;
struct F16;
struct BF16;

impl Format for F32 {
    const BYTES: usize = 4;
    #[inline(always)]
    unsafe fn load8(row: *const u8, k: usize) -> __m256 {
        _mm256_loadu_ps(row.add(4 * k).cast())
    }
    #[inline(always)]
    unsafe fn load16(row: *const u8, k: usize) -> __m512 {
        _mm512_loadu_ps(row.add(4 * k).cast())
    }
}

impl Format for F16 {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load8(row: *const u8, k: usize) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(row.add(2 * k).cast()))
    }
    #[inline(always)]
    unsafe fn load16(row: *const u8, k: usize) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(row.add(2 * k).cast()))
    }
}

impl Format for BF16 {
    const BYTES: usize = 2;
    // A bf16 is the top half of an f32.
    #[inline(always)]
    unsafe fn load8(row: *const u8, k: usize) -> __m256 {
        let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(row.add(2 * k).cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16))
    }
    #[inline(always)]
    unsafe fn load16(row: *const u8, k: usize) -> __m512 {
        let bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(row.add(2 * k).cast()));
        _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16))
    }
}

/// The lanes the tiles take (`Lanes`: AVX2's 8 or AVX-512's 16), their microkernel's shape,
/// and how a format's weights load into them.
trait Tiles: Lanes {
    /// Activation rows per decoding microkernel: what the registers hold beside three weight
    /// vectors and one activation vector (16 ymm, 32 zmm).
    const QUAD: usize;
    /// A prompt microkernel's weight rows and activation rows.
    const PROMPT_STRIP: usize = STRIP;
    const PROMPT_QUAD: usize = Self::QUAD;
    unsafe fn weights<F: Format>(row: *const u8, k: usize) -> Self::V;
}

impl Tiles for Avx2 {
    const QUAD: usize = 4;
    #[inline(always)]
    unsafe fn weights<F: Format>(row: *const u8, k: usize) -> __m256 {
        F::load8(row, k)
    }
}

impl Tiles for Avx512 {
    const QUAD: usize = 8;
    /// Six weight rows by four activation rows (24 sums, six weight vectors and one
    /// activation vector in 32 registers), not three by eight: each activation vector loaded
    /// serves six weight rows, so a prompt reads its activations (from L2: eight rows of up
    /// to 8,192 columns) half as often. Per 64-row pass on a 2-vCPU Zen 4, alternating, one
    /// thread: F16 9216×3072 37.4-38.6 -> 35.5-35.9 ms (90% of the FMA peak measured there),
    /// 3072×8192 32.3-32.6 -> 30.8-30.9, F32 40-41 -> 37-38 and 37 -> 33; two threads, F16
    /// 19.1-20.2 -> 18.0-19.6 and 16.4 -> 15.4-16.0. Four by six was slower (52.9 ms: a
    /// tile's eight rows go as six and two).
    const PROMPT_STRIP: usize = 6;
    const PROMPT_QUAD: usize = 4;
    #[inline(always)]
    unsafe fn weights<F: Format>(row: *const u8, k: usize) -> __m512 {
        F::load16(row, k)
    }
}

/// Weight rows `rows` of a matrix (their bytes `weights`, `cols` values each) with the `m`
/// activation rows `x`, into `out[i * stride + r]` for each row r and activation i.
pub struct FloatGroup<'a> {
    pub format: FloatFormat,
    pub weights: &'a [u8],
    pub cols: usize,
    pub x: &'a [f32],
    pub m: usize,
    pub out: OutPtr,
    pub rows: Range<usize>,
    pub stride: usize,
    /// AVX-512's 16 lanes (the CPU has AVX-512F; `cols` is a multiple of 16); else
    /// AVX2's 8.
    pub wide: bool,
}

/// Safety: the CPU must have AVX2, FMA and F16C; `cols` is a multiple of 8; `weights`
/// holds `rows.len()` rows and `x` `m` rows; `out` has room for `m * stride` values, and no
/// other thread writes these rows' outputs meanwhile; with `wide`, as it says.
pub unsafe fn float_group(g: &FloatGroup<'_>) {
    match (g.format, g.wide) {
        (FloatFormat::F32, false) => group_avx2::<F32>(g),
        (FloatFormat::F16, false) => group_avx2::<F16>(g),
        (FloatFormat::BF16, false) => group_avx2::<BF16>(g),
        (FloatFormat::F32, true) => group_avx512::<F32>(g),
        (FloatFormat::F16, true) => group_avx512::<F16>(g),
        (FloatFormat::BF16, true) => group_avx512::<BF16>(g),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_avx2<F: Format>(g: &FloatGroup<'_>) {
    group::<F, Avx2>(g)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn group_avx512<F: Format>(g: &FloatGroup<'_>) {
    group::<F, Avx512>(g)
}

#[inline(always)]
unsafe fn group<F: Format, L: Tiles>(g: &FloatGroup<'_>) {
    let n = g.rows.len();
    let cols = g.cols;
    debug_assert!(cols.is_multiple_of(L::LANES) && g.weights.len() >= n * cols * F::BYTES);
    debug_assert!(g.x.len() >= g.m * cols);
    let w = |j: usize| g.weights.as_ptr().add(j * cols * F::BYTES);
    let x = |i: usize| g.x.as_ptr().add(i * cols);
    let decoding = g.m <= ACTS;
    let chunk = if decoding { cols } else { PASS_COLUMNS };
    let (strip, quad) = match (decoding, g.m) {
        (true, 1) => (ONE_STREAM_STRIP, L::QUAD),
        (true, _) => (STRIP, L::QUAD),
        (false, _) => (L::PROMPT_STRIP, L::PROMPT_QUAD),
    };
    // Sums for the rows of one tile: a decoding stream's one column, not ACTS (zeroing eight
    // columns for every group of 48 rows had been 3% of an F16 decode's samples).
    let width = g.m.min(ACTS);
    let mut acc = vec![L::zero(); n * width];
    for first_act in (0..g.m).step_by(ACTS) {
        let acts = first_act..(first_act + ACTS).min(g.m);
        acc.fill(L::zero());
        for k0 in (0..cols).step_by(chunk) {
            let k = k0..(k0 + chunk).min(cols);
            for j in (0..n).step_by(strip) {
                for i in acts.clone().step_by(quad) {
                    let (r, a) = ((n - j).min(strip), (acts.end - i).min(quad));
                    let at = Micro {
                        // Slots past the strip's rows repeat its first (and compute nothing).
                        w: std::array::from_fn(|q| w(j + q * (r > q) as usize)),
                        x: x(i),
                        x_stride: cols,
                        k: k.clone(),
                        acc: acc.as_mut_ptr().add(j * width + (i - first_act)),
                        acc_stride: width,
                    };
                    micro_any::<F, L>(&at, r, a, decoding);
                }
            }
        }
        for j in 0..n {
            for i in acts.clone() {
                let sum = hsum(L::fold(acc[j * width + i - first_act]));
                *g.out.at(i * g.stride + g.rows.start + j) = sum;
            }
        }
    }
}

/// One microkernel's operands: up to three weight rows, the first of its activation rows
/// and the distance between them, the columns, and where its sums live
/// (`acc[j * acc_stride + i]`). The rows' addresses are worked out inside the microkernel: an
/// array of them built here went through a masked vector store that the microkernel's loads
/// could not forward from, a stall on 9-14% of an F16 prompt's samples (without it, a
/// 512-token prompt of the 8-layer file took 6.4-6.6 s against 6.8-7.0 on the Xeon VM).
struct Micro<V> {
    w: [*const u8; MAX_STRIP],
    x: *const f32,
    x_stride: usize,
    k: Range<usize>,
    acc: *mut V,
    /// Sums from one weight row to the next.
    acc_stride: usize,
}

/// The microkernel for `r` weight rows and `a` activation rows: decoding's strips of 1-3
/// rows, prefetching, with AVX-512's rows beyond four going as eight (the extra sums
/// computed and dropped), which keeps its instances few; prompts' strips of 1-6 rows (six
/// with AVX-512, three with AVX2) with quads of 1-4.
#[inline(always)]
unsafe fn micro_any<F: Format, L: Tiles>(at: &Micro<L::V>, r: usize, a: usize, prefetch: bool) {
    macro_rules! by_shape {
        (decoding: $(($dr:literal, $da:literal)),*; prompts: $(($pr:literal, $pa:literal)),*) => {
            match (r, if a > 4 { 8 } else { a }, prefetch) {
                $(($dr, $da, true) => micro::<F, L, $dr, $da, true>(at, a),)*
                $(($pr, $pa, false) => micro::<F, L, $pr, $pa, false>(at, a),)*
                _ => unreachable!("the shapes listed: {r} x {a}, prefetch {prefetch}"),
            }
        };
    }
    by_shape!(
        decoding: (3, 8), (3, 4), (3, 3), (3, 2), (3, 1), (2, 8), (2, 4), (2, 3), (2, 2),
        (2, 1), (1, 8), (1, 4), (1, 3), (1, 2), (1, 1);
        prompts: (6, 4), (6, 3), (6, 2), (6, 1), (5, 4), (5, 3), (5, 2), (5, 1), (4, 4),
        (4, 3), (4, 2), (4, 1), (3, 4), (3, 3), (3, 2), (3, 1), (2, 4), (2, 3), (2, 2),
        (2, 1), (1, 4), (1, 3), (1, 2), (1, 1)
    )
}

/// `acc[j][i] += w[j] · x[i]` over the columns `k`, for the first `real` activation rows of
/// the `A` computed.
// Indexes: the loops walk a grid of registers (weight row j, activation row i).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn micro<F: Format, L: Tiles, const R: usize, const A: usize, const PREFETCH: bool>(
    at: &Micro<L::V>,
    real: usize,
) {
    let mut c = [[L::zero(); A]; R];
    for (j, row) in c.iter_mut().enumerate() {
        for (i, v) in row.iter_mut().enumerate().take(real) {
            *v = *at.acc.add(j * at.acc_stride + i);
        }
    }
    // Slots past the real rows repeat the last (their sums are dropped). Every slot
    // computed the same way: a loop over the real ones only became a masked store.
    let x: [*const f32; A] = std::array::from_fn(|i| at.x.add(i.min(real - 1) * at.x_stride));
    for k in at.k.clone().step_by(L::LANES) {
        if PREFETCH && (k * F::BYTES).is_multiple_of(64) {
            for w in &at.w[..R] {
                let ahead = w.wrapping_add(k * F::BYTES + PREFETCH_AHEAD);
                _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
            }
        }
        // A loop, not `array::from_fn`: a closure would not inherit the target features, and
        // its intrinsics would be calls.
        let mut w = [L::zero(); R];
        for (j, w) in w.iter_mut().enumerate() {
            *w = L::weights::<F>(at.w[j], k);
        }
        for i in 0..A {
            let xv = L::load(x[i].add(k));
            for j in 0..R {
                c[j][i] = L::fmadd(w[j], xv, c[j][i]);
            }
        }
    }
    for (j, row) in c.iter().enumerate() {
        for (i, v) in row.iter().enumerate().take(real) {
            *at.acc.add(j * at.acc_stride + i) = *v;
        }
    }
}
