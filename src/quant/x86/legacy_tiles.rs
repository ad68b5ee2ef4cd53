//! Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 weight rows times Q8_0 activation rows, with AVX2: per
//! 32 values, unsigned weights times signed activations (`maddubs`: Q8_0's signed weights
//! as their magnitudes, the activations taking their signs), pairs summed to i32 (`madd`;
//! with VNNI one `vpdpbusd` does both), scaled by both blocks' scales into f32 sums; a
//! weight block's minimum (or offset) adds m · the activation block's sum. A microkernel
//! of 2 weight rows × 4 activation rows unpacks each weight block once for four rows and
//! keeps its eight sums in registers. Decoding (a few rows) prefetches 16 KiB ahead into L2
//! (`STREAM_AHEAD`).

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::legacy::{BlockQ8_0, LegacyBlock};
use super::super::OutPtr;
use super::group_dot::{Evex, GroupDot, Vex};
use super::{f32_of, lane_totals, load, Avx2};

/// Activation rows per tile, and per microkernel; weight rows per microkernel.
const ACTS: usize = 16;
const QUAD: usize = 4;
const PAIR: usize = 2;
/// Rows up to which tiles prefetch (decoding streams).
const PREFETCH_ACTS: usize = 8;
const PREFETCH_AHEAD: usize = super::STREAM_AHEAD;

/// Weight rows `rows` (`weights`: `blocks` blocks a row) with the `m` activation rows
/// `acts`, into `out[i * stride + r]`; per activation block, `scales` holds its d as f32,
/// `offsets` B::OFFSET · Σ q where the weights have an offset, `sums` d · Σ q where they
/// store a minimum.
pub struct LegacyGroup<'a, B> {
    pub weights: &'a [B],
    pub acts: &'a [BlockQ8_0],
    pub scales: &'a [f32],
    pub offsets: &'a [i32],
    pub sums: &'a [f32],
    pub blocks: usize,
    pub m: usize,
    pub out: OutPtr,
    pub rows: Range<usize>,
    pub stride: usize,
}

/// Safety: the CPU must have AVX2, FMA and F16C; `weights` holds `rows.len()` rows and
/// `acts` `m` rows of `blocks` blocks (and `scales` as many values, `offsets` too if
/// `B::OFFSET` is not 0, `sums` if `B::STORED_MIN`); `out` has room for `m * stride`
/// values, and no other thread writes these rows' outputs meanwhile.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn legacy_group_avx2<B: LegacyBlock>(g: &LegacyGroup<'_, B>) {
    group::<Avx2, B>(g)
}

/// `legacy_group_avx2`, with AVX-VNNI (`has_avx_vnni`).
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn legacy_group_avx_vnni<B: LegacyBlock>(g: &LegacyGroup<'_, B>) {
    group::<Vex, B>(g)
}

/// `legacy_group_avx2`, with AVX-512 VNNI's encoding (`has_avx512_vnni`).
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub unsafe fn legacy_group_avx512_vnni<B: LegacyBlock>(g: &LegacyGroup<'_, B>) {
    group::<Evex, B>(g)
}

#[inline(always)]
unsafe fn group<D: GroupDot, B: LegacyBlock>(g: &LegacyGroup<'_, B>) {
    let n = g.rows.len();
    let nb = g.blocks;
    debug_assert!(g.weights.len() >= n * nb && g.acts.len() >= g.m * nb);
    debug_assert!(g.scales.len() >= g.m * nb);
    debug_assert!(B::OFFSET == 0 || g.offsets.len() >= g.m * nb);
    debug_assert!(!B::STORED_MIN || g.sums.len() >= g.m * nb);
    // No rows left (the interleaved groups took them all, as in prompts of a multiple of
    // eight rows): nothing to read.
    if g.m == 0 {
        return;
    }
    let w = |j: usize| g.weights.as_ptr().add(j * nb);
    let x = |i: usize| g.acts.as_ptr().add(i * nb);
    let d = |i: usize| g.scales.as_ptr().add(i * nb);
    // Only read where B has an offset or a minimum (empty otherwise): wrapping, never out
    // of bounds for nothing.
    let s = |i: usize| g.sums.as_ptr().wrapping_add(i * nb);
    let o = |i: usize| g.offsets.as_ptr().wrapping_add(i * nb);
    let prefetch = g.m <= PREFETCH_ACTS;
    // Decoding 4- and 5-bit types: weight rows eight at a time where there are eight,
    // pairs for the rest.
    let mut eights = 0;
    if g.m <= EIGHT_ROWS_ACTS && std::mem::size_of::<B>() <= EIGHT_ROWS_BLOCK_BYTES {
        eights = n / 8 * 8;
        for j in (0..eights).step_by(8) {
            match g.m {
                1 => eight_rows::<D, B, 1>(g, j),
                2 => eight_rows::<D, B, 2>(g, j),
                3 => eight_rows::<D, B, 3>(g, j),
                _ => eight_rows::<D, B, 4>(g, j),
            }
        }
    }
    for first in (0..g.m).step_by(ACTS) {
        let acts = first..(first + ACTS).min(g.m);
        for j in (eights..n).step_by(PAIR) {
            for i in acts.clone().step_by(QUAD) {
                let (r, a) = ((n - j).min(PAIR), (acts.end - i).min(QUAD));
                let row = |k: usize| i + k * (a > k) as usize;
                let at = Micro {
                    w: [w(j), w(j + (r > 1) as usize)],
                    x: [x(row(0)), x(row(1)), x(row(2)), x(row(3))],
                    d: [d(row(0)), d(row(1)), d(row(2)), d(row(3))],
                    s: [s(row(0)), s(row(1)), s(row(2)), s(row(3))],
                    o: [o(row(0)), o(row(1)), o(row(2)), o(row(3))],
                    blocks: nb,
                };
                let sums = micro_any::<D, B>(&at, r, a, prefetch);
                for (dj, sums) in sums.iter().enumerate().take(r) {
                    for (di, &sum) in sums.iter().enumerate().take(a) {
                        *g.out.at((i + di) * g.stride + g.rows.start + j + dj) = sum;
                    }
                }
            }
        }
    }
}

/// Activation rows up to which weight rows go eight at a time (`eight_rows`).
const EIGHT_ROWS_ACTS: usize = 4;
/// The block sizes that go eight rows at a time: the 4- and 5-bit types (Q4_0 18 bytes,
/// Q4_1 20, Q5_0 22, Q5_1 24), whose decode is bound by the work per block. Measured on a
/// Xeon with AVX-VNNI, 8-layer Phi-3-mini-shaped files, one stream: Q4_0 21 -> 26 tokens/s,
/// Q4_1 24 -> 26. The 5-bit types went pairs there (Q5_0 20.0 -> 19.2) until the eight
/// rows' scales came ready-made; since, on a Zen 4 (AVX-512 VNNI), one thread, a pass of a
/// 24576×3072 matrix: Q5_0 10.9-11.6 -> 13.1-13.3 GB/s, Q5_1 11.3-11.7 -> 11.9-12.3. Q8_0
/// stays in pairs: eight of its rows side by side read memory worse (23.4 -> 18.4 GB/s,
/// though 26 -> 33 from L2).
const EIGHT_ROWS_BLOCK_BYTES: usize = 24;

/// Weight rows `j..j + 8` with every activation row (at most `EIGHT_ROWS_ACTS`): a block's
/// eight integer totals come out of one reduction into the lanes of one vector, and are
/// scaled there together, where the pairs' microkernel reduces and scales each on its own
/// (the bulk of the work per 32 values when one or two activation rows share it). Each
/// lane computes what `micro` does, in the same order, so the results are the same bits.
/// The M activation rows (`g.m`) are a constant, so their loops unroll: one stream of the
/// 8-layer Q4_0 file on a Zen 4, alternating, 56.5-56.9 -> 58.8-59.1 tokens/s (AVX2 50.7-51.5
/// -> 52.9-54.9).
// Indexes: the loops walk the eight rows' registers and the activation rows' sums.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn eight_rows<D: GroupDot, B: LegacyBlock, const M: usize>(
    g: &LegacyGroup<'_, B>,
    j: usize,
) {
    let nb = g.blocks;
    debug_assert!(g.m == M);
    let mut acc = [_mm256_setzero_ps(); M];
    let mut w = [UnpackedBlock::ZERO; 8];
    for b in 0..nb {
        let block = |k: usize| &*g.weights.as_ptr().add((j + k) * nb + b);
        for k in 0..8 {
            w[k] = UnpackedBlock::of(block(k), true);
        }
        let wd = half_lanes(|k| block(k).d().to_bits());
        let wm = if B::STORED_MIN {
            half_lanes(|k| block(k).m_bits().to_bits())
        } else {
            _mm256_setzero_ps()
        };
        for i in 0..M {
            let at = i * nb + b;
            let yv = load(g.acts.get_unchecked(at).qs.as_ptr());
            let mut dots = [_mm256_setzero_si256(); 8];
            for k in 0..8 {
                dots[k] = w[k].dot::<D, B>(yv);
            }
            let mut total = lane_totals(dots);
            if B::OFFSET != 0 {
                total = _mm256_add_epi32(total, _mm256_set1_epi32(*g.offsets.get_unchecked(at)));
            }
            let scale = _mm256_mul_ps(wd, _mm256_set1_ps(*g.scales.get_unchecked(at)));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), scale, acc[i]);
            if B::STORED_MIN {
                acc[i] = _mm256_fmadd_ps(wm, _mm256_set1_ps(*g.sums.get_unchecked(at)), acc[i]);
            }
        }
    }
    for i in 0..M {
        let mut sums = [0f32; 8];
        _mm256_storeu_ps(sums.as_mut_ptr(), acc[i]);
        for (k, &sum) in sums.iter().enumerate() {
            *g.out.at(i * g.stride + g.rows.start + j + k) = sum;
        }
    }
}

/// Eight f16 factors (`bits(k)`, one per weight row) as f32 lanes. The words are joined in
/// general-purpose registers: inserting them into a vector one by one took eight shuffles
/// and seven more to join them, on the ports the lane totals' shuffles need.
#[inline(always)]
unsafe fn half_lanes(bits: impl Fn(usize) -> u16) -> __m256 {
    let word = |k: usize| u64::from(bits(k)) << (16 * (k % 4));
    let low = word(0) | word(1) | word(2) | word(3);
    let high = word(4) | word(5) | word(6) | word(7);
    _mm256_cvtph_ps(_mm_set_epi64x(high as i64, low as i64))
}

/// A weight block's values as bytes, and for the signed type (Q8_0) their magnitudes: the
/// products' first operand must be unsigned.
#[derive(Clone, Copy)]
struct UnpackedBlock {
    values: __m256i,
    magnitudes: __m256i,
}

impl UnpackedBlock {
    // SAFETY: all-zero bits are a valid __m256i.
    const ZERO: Self = unsafe { std::mem::zeroed() };

    /// `block` unpacked, having asked for the block a page ahead if `prefetch` (decoding).
    #[inline(always)]
    unsafe fn of<B: LegacyBlock>(block: &B, prefetch: bool) -> Self {
        if prefetch {
            let ahead = (block as *const B)
                .cast::<i8>()
                .wrapping_add(PREFETCH_AHEAD);
            _mm_prefetch::<_MM_HINT_T1>(ahead);
        }
        let values = block.unpack();
        let magnitudes = if B::SIGNED {
            _mm256_sign_epi8(values, values)
        } else {
            values
        };
        Self { values, magnitudes }
    }

    /// Σ4 w · y per i32 lane with the activations `y`.
    #[inline(always)]
    unsafe fn dot<D: GroupDot, B: LegacyBlock>(self, y: __m256i) -> __m256i {
        if B::SIGNED {
            // |w| · (y with w's sign) = w · y, with an unsigned first operand.
            D::dot(self.magnitudes, _mm256_sign_epi8(y, self.values))
        } else {
            D::dot(self.values, y)
        }
    }
}

/// Up to two weight rows and four activation rows, with their blocks' scales, offset terms
/// and sums (unused slots repeat the first).
struct Micro<B> {
    w: [*const B; PAIR],
    x: [*const BlockQ8_0; QUAD],
    d: [*const f32; QUAD],
    s: [*const f32; QUAD],
    o: [*const i32; QUAD],
    blocks: usize,
}

#[inline(always)]
unsafe fn micro_any<D: GroupDot, B: LegacyBlock>(
    at: &Micro<B>,
    r: usize,
    a: usize,
    prefetch: bool,
) -> [[f32; QUAD]; PAIR] {
    macro_rules! by_shape {
        ($(($r:literal, $a:literal)),*) => {
            match (r, a, prefetch) {
                $(
                    ($r, $a, true) => widen(micro::<D, B, $r, $a, true>(at)),
                    ($r, $a, false) => widen(micro::<D, B, $r, $a, false>(at)),
                )*
                _ => unreachable!("pairs of 1-2 rows, quads of 1-4"),
            }
        };
    }
    by_shape!(
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

/// The R × A sums in the corner of a full-size array.
#[inline(always)]
fn widen<const R: usize, const A: usize>(sums: [[f32; A]; R]) -> [[f32; QUAD]; PAIR] {
    let mut out = [[0f32; QUAD]; PAIR];
    for (o, s) in out.iter_mut().zip(sums) {
        o[..A].copy_from_slice(&s);
    }
    out
}

// Indexes: the loops walk a grid of registers (weight row j, activation row i).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn micro<
    D: GroupDot,
    B: LegacyBlock,
    const R: usize,
    const A: usize,
    const PREFETCH: bool,
>(
    at: &Micro<B>,
) -> [[f32; A]; R] {
    // Each product in the interleaved kernels' order, so a row's result does not depend on
    // the rows beside it (the batcher's promise): per block, the exact integer sum less the
    // weights' integer offset, scaled in one fused step; then the stored minimum's term.
    let mut acc = [[0f32; A]; R];
    // Loops, not `array::from_fn`: a closure would not inherit the target features, and
    // its intrinsics would be calls.
    let mut w = [UnpackedBlock::ZERO; R];
    let mut wd = [0f32; R];
    let mut wm = [0f32; R];
    for b in 0..at.blocks {
        for j in 0..R {
            let block = &*at.w[j].add(b);
            w[j] = UnpackedBlock::of(block, PREFETCH);
            wd[j] = f32_of(block.d());
            if B::STORED_MIN {
                wm[j] = f32_of(block.m_bits());
            }
        }
        for i in 0..A {
            let yv = load((*at.x[i].add(b)).qs.as_ptr());
            let yd = *at.d[i].add(b);
            for j in 0..R {
                let mut total = hsum_i32(w[j].dot::<D, B>(yv));
                if B::OFFSET != 0 {
                    total += *at.o[i].add(b);
                }
                acc[j][i] = (total as f32).mul_add(wd[j] * yd, acc[j][i]);
                if B::STORED_MIN {
                    acc[j][i] = wm[j].mul_add(*at.s[i].add(b), acc[j][i]);
                }
            }
        }
    }
    acc
}

/// The sum of the eight lanes.
#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<1>(s));
    _mm_cvtsi128_si32(s)
}
