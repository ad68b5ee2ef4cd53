//! F32, F16 and BF16 weight rows times f32 activation rows, with AVX2 + FMA (F16C converts
//! f16, a shift bf16). A microkernel of 3 weight rows × 4 activation rows keeps its twelve
//! sums in registers (with the three weight vectors and one activation vector: all sixteen
//! ymm registers). A group's weight rows (up to 48: 288 KiB of f16 at Phi-3-mini's 3072
//! columns) stay in L2 while every tile of 16 activation rows passes; prompt tiles go 256
//! columns at a time, so the tile's activations stay in L1 meanwhile. Decoding (a few rows)
//! streams each weight strip over all its columns, prefetched a page ahead.

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::float::FloatFormat;
use super::super::OutPtr;
use super::hsum;

/// Activation rows per tile.
const ACTS: usize = 16;
/// Columns per pass of a prompt tile: 16 rows × 1 KiB of activations.
const CHUNK: usize = 256;
/// Weight rows per microkernel strip, and activation rows per microkernel.
const STRIP: usize = 3;
const QUAD: usize = 4;
/// As the K-quant decode path: the hardware prefetchers stop at page boundaries.
const PREFETCH_AHEAD: usize = 4096;

/// How eight values of a format become f32.
trait Load8 {
    const BYTES: usize;
    unsafe fn load8(row: *const u8, k: usize) -> __m256;
}

struct F32;
struct F16;
struct BF16;

impl Load8 for F32 {
    const BYTES: usize = 4;
    #[inline(always)]
    unsafe fn load8(row: *const u8, k: usize) -> __m256 {
        _mm256_loadu_ps(row.add(4 * k).cast())
    }
}

impl Load8 for F16 {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load8(row: *const u8, k: usize) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(row.add(2 * k).cast()))
    }
}

impl Load8 for BF16 {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load8(row: *const u8, k: usize) -> __m256 {
        // A bf16 is the top half of an f32.
        let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(row.add(2 * k).cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16))
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
}

/// Safety: the CPU must have AVX2, FMA and F16C; `cols` is a multiple of 8; `weights`
/// holds `rows.len()` rows and `x` `m` rows; `out` has room for `m * stride` values, and no
/// other thread writes these rows' outputs meanwhile.
pub unsafe fn float_group(g: &FloatGroup<'_>) {
    match g.format {
        FloatFormat::F32 => group::<F32>(g),
        FloatFormat::F16 => group::<F16>(g),
        FloatFormat::BF16 => group::<BF16>(g),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<F: Load8>(g: &FloatGroup<'_>) {
    let n = g.rows.len();
    let cols = g.cols;
    debug_assert!(cols.is_multiple_of(8) && g.weights.len() >= n * cols * F::BYTES);
    debug_assert!(g.x.len() >= g.m * cols);
    let w = |j: usize| g.weights.as_ptr().add(j * cols * F::BYTES);
    let x = |i: usize| g.x.as_ptr().add(i * cols);
    let decoding = g.m <= ACTS;
    let chunk = if decoding { cols } else { CHUNK };
    let mut acc = vec![_mm256_setzero_ps(); n * ACTS];
    for first_act in (0..g.m).step_by(ACTS) {
        let acts = first_act..(first_act + ACTS).min(g.m);
        acc.fill(_mm256_setzero_ps());
        for k0 in (0..cols).step_by(chunk) {
            let k = k0..(k0 + chunk).min(cols);
            for j in (0..n).step_by(STRIP) {
                for i in acts.clone().step_by(QUAD) {
                    let (r, a) = ((n - j).min(STRIP), (acts.end - i).min(QUAD));
                    let at = Micro {
                        w: [w(j), w(j + (r > 1) as usize), w(j + 2 * (r > 2) as usize)],
                        x: [
                            x(i),
                            x(i + (a > 1) as usize),
                            x(i + 2 * (a > 2) as usize),
                            x(i + 3 * (a > 3) as usize),
                        ],
                        k: k.clone(),
                        acc: acc.as_mut_ptr().add(j * ACTS + (i - first_act)),
                    };
                    micro_any::<F>(&at, r, a, decoding);
                }
            }
        }
        for j in 0..n {
            for i in acts.clone() {
                let sum = hsum(acc[j * ACTS + i - first_act]);
                *g.out.at(i * g.stride + g.rows.start + j) = sum;
            }
        }
    }
}

/// One microkernel's operands: up to three weight rows, up to four activation rows (unused
/// slots repeat the first), the columns, and where its sums live (`acc[j * ACTS + i]`).
struct Micro {
    w: [*const u8; STRIP],
    x: [*const f32; QUAD],
    k: Range<usize>,
    acc: *mut __m256,
}

#[inline(always)]
unsafe fn micro_any<F: Load8>(at: &Micro, r: usize, a: usize, prefetch: bool) {
    macro_rules! by_shape {
        ($(($r:literal, $a:literal)),*) => {
            match (r, a, prefetch) {
                $(
                    ($r, $a, true) => micro::<F, $r, $a, true>(at),
                    ($r, $a, false) => micro::<F, $r, $a, false>(at),
                )*
                _ => unreachable!("strips of 1-3 rows, quads of 1-4"),
            }
        };
    }
    by_shape!(
        (3, 4),
        (3, 3),
        (3, 2),
        (3, 1),
        (2, 4),
        (2, 3),
        (2, 2),
        (2, 1),
        (1, 4),
        (1, 3),
        (1, 2),
        (1, 1)
    )
}

// Indexes: the loops walk a grid of registers (weight row j, activation row i).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn micro<F: Load8, const R: usize, const A: usize, const PREFETCH: bool>(at: &Micro) {
    let mut c = [[_mm256_setzero_ps(); A]; R];
    for (j, row) in c.iter_mut().enumerate() {
        for (i, v) in row.iter_mut().enumerate() {
            *v = *at.acc.add(j * ACTS + i);
        }
    }
    for k in at.k.clone().step_by(8) {
        if PREFETCH && (k * F::BYTES).is_multiple_of(64) {
            for w in &at.w[..R] {
                let ahead = w.wrapping_add(k * F::BYTES + PREFETCH_AHEAD);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            }
        }
        // A loop, not `array::from_fn`: a closure would not inherit the target features, and
        // its intrinsics would be calls.
        let mut w = [_mm256_setzero_ps(); R];
        for (j, w) in w.iter_mut().enumerate() {
            *w = F::load8(at.w[j], k);
        }
        for i in 0..A {
            let xv = _mm256_loadu_ps(at.x[i].add(k));
            for j in 0..R {
                c[j][i] = _mm256_fmadd_ps(w[j], xv, c[j][i]);
            }
        }
    }
    for (j, row) in c.iter().enumerate() {
        for (i, v) in row.iter().enumerate() {
            *at.acc.add(j * ACTS + i) = *v;
        }
    }
}
