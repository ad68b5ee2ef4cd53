//! Prompt products of the 32-value types, eight activation rows at a time: the rows are
//! interleaved by four values (`BlockQ8_0x8`), so one `vpdpbusd` multiplies four weights,
//! broadcast, with eight rows, and a weight block's eight broadcasts serve up to 32 rows.
//! Per 32 values and eight rows: eight products, one subtraction of the weights' integer
//! excess, one conversion and one scaling, where the row-by-row tiles spend some forty
//! instructions. Without VNNI, `maddubs` stands in for `vpdpbusd`: the 4- and 5-bit types'
//! pairs are summed in i16 over four or eight quads, then to i32 by one `madd`; Q8_0's
//! weights (which `maddubs` would saturate on, shifted to unsigned) go as their magnitudes,
//! the activations taking their signs, and each quad's pairs to i32 at once (the chain
//! of `group_dot.rs`, shared with the K-quant groups).

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::legacy::{BlockQ8_0x8, LegacyBlock};
use super::super::{Kernels, OutPtr};
use super::group_dot::{chain_ends, chain_span, exact_steps, Evex, GroupDot, Vex};
use super::{f32_of, load, Avx2};

/// Groups of eight activation rows per pass over a weight row: their accumulators and the
/// weight block's eight broadcasts fill the sixteen registers.
const GROUPS: usize = 4;

/// Weight rows `rows` (`weights`: `blocks` blocks a row) with every group of eight
/// activation rows in `groups` (`blocks` interleaved blocks a group), into
/// `out[i * stride + r]` for activation row i.
pub struct InterleavedGroup<'a, B> {
    pub weights: &'a [B],
    pub groups: &'a [BlockQ8_0x8],
    pub blocks: usize,
    pub out: OutPtr,
    pub rows: Range<usize>,
    pub stride: usize,
}

/// One of the kernels below.
pub type InterleavedKernel<B> = for<'a> unsafe fn(&InterleavedGroup<'a, B>);

/// The kernel for B with `kernels`, if they have one.
pub fn interleaved<B: LegacyBlock>(kernels: Kernels) -> Option<InterleavedKernel<B>> {
    match kernels {
        Kernels::AvxVnni => Some(interleaved_avx_vnni::<B>),
        Kernels::Avx512Vnni => Some(interleaved_avx512_vnni::<B>),
        Kernels::Avx2 => Some(interleaved_avx2::<B>),
        _ => None,
    }
}

/// Safety: the CPU must have AVX2, FMA and F16C; `weights` holds `rows.len()` rows and `groups`
/// whole groups of `blocks` blocks, built with B's `EXCESS`; `out` has room for every group's rows
/// at `stride`, and no other thread writes these rows' outputs meanwhile.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn interleaved_avx2<B: LegacyBlock>(g: &InterleavedGroup<'_, B>) {
    run::<Avx2, B>(g)
}

/// `interleaved_avx2`, with AVX-VNNI (`has_avx_vnni`), for every type.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn interleaved_avx_vnni<B: LegacyBlock>(g: &InterleavedGroup<'_, B>) {
    run::<Vex, B>(g)
}

/// `interleaved_avx2`, with AVX-512 VNNI's encoding (`has_avx512_vnni`), for every type.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub unsafe fn interleaved_avx512_vnni<B: LegacyBlock>(g: &InterleavedGroup<'_, B>) {
    run::<Evex, B>(g)
}

#[inline(always)]
unsafe fn run<D: GroupDot, B: LegacyBlock>(g: &InterleavedGroup<'_, B>) {
    let nb = g.blocks;
    let n_groups = g.groups.len() / nb;
    debug_assert!(g.weights.len() >= g.rows.len() * nb && g.groups.len() == n_groups * nb);
    for first in (0..n_groups).step_by(GROUPS) {
        let count = (n_groups - first).min(GROUPS);
        // Unused slots repeat the last group; their sums are not stored.
        let x = |k: usize| g.groups.as_ptr().add((first + k.min(count - 1)) * nb);
        let xs = [x(0), x(1), x(2), x(3)];
        for j in 0..g.rows.len() {
            let w = g.weights.as_ptr().add(j * nb);
            let sums = match count {
                1 => widen(pass::<D, B, 1>(w, &xs, nb)),
                2 => widen(pass::<D, B, 2>(w, &xs, nb)),
                3 => widen(pass::<D, B, 3>(w, &xs, nb)),
                _ => widen(pass::<D, B, 4>(w, &xs, nb)),
            };
            for (k, sums) in sums.iter().enumerate().take(count) {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *sums);
                for (r, &v) in lanes.iter().enumerate() {
                    *g.out
                        .at((8 * (first + k) + r) * g.stride + g.rows.start + j) = v;
                }
            }
        }
    }
}

/// The G sums in the front of a full-size array.
#[inline(always)]
unsafe fn widen<const G: usize>(sums: [__m256; G]) -> [__m256; GROUPS] {
    let mut out = [_mm256_setzero_ps(); GROUPS];
    out[..G].copy_from_slice(&sums);
    out
}

/// One weight row (`w`, `nb` blocks) with G groups of eight rows: lane r of sum k is row r
/// of group k.
// Indexes: the loops walk the weight block's four-value quads and the groups.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn pass<D: GroupDot, B: LegacyBlock, const G: usize>(
    w: *const B,
    xs: &[*const BlockQ8_0x8; GROUPS],
    nb: usize,
) -> [__m256; G] {
    // Q8_0's weights, shifted by 128 to be unsigned, reach 255: where a step of those is
    // not exact (`maddubs` would saturate), they go as magnitudes with the activations
    // taking their signs, and the products carry no excess.
    let by_magnitude = B::SIGNED && exact_steps::<D>(255) == 0;
    let span = chain_span::<D>(match (B::SIGNED, by_magnitude) {
        (true, true) => 128,
        (true, false) => 255,
        (false, _) => B::MAX_VALUE,
    });
    let mut acc = [_mm256_setzero_ps(); G];
    let mut quads = [0i32; 8];
    let mut magnitudes = [0i32; 8];
    for b in 0..nb {
        let block = &*w.add(b);
        let mut wv = block.unpack();
        if by_magnitude {
            _mm256_storeu_si256(magnitudes.as_mut_ptr().cast(), _mm256_abs_epi8(wv));
        } else if B::SIGNED {
            // w + 128: unsigned, as `vpdpbusd` takes it (the excess is taken off below).
            wv = _mm256_xor_si256(wv, _mm256_set1_epi8(i8::MIN));
        }
        _mm256_storeu_si256(quads.as_mut_ptr().cast(), wv);
        let mut wq = [_mm256_setzero_si256(); 8];
        for q in 0..8 {
            wq[q] = _mm256_set1_epi32(quads[q]);
        }
        let wd = _mm256_set1_ps(f32_of(block.d()));
        for k in 0..G {
            let x = &*xs[k].add(b);
            // The activations' quad q of the eight rows.
            let y = x.qs.as_ptr();
            // Quads chained while exact (AVX2's i16 lanes: all eight below 16, four below
            // 32, one for Q8_0's magnitudes; VNNI's i32 lanes: all eight), widened to i32.
            let mut dots = _mm256_setzero_si256();
            let mut chain = _mm256_setzero_si256();
            for q in 0..8 {
                let yq = load(y.add(32 * q));
                chain = if by_magnitude {
                    // |w| · (y with w's sign) = w · y.
                    let w = _mm256_set1_epi32(magnitudes[q]);
                    D::step(chain, w, _mm256_sign_epi8(yq, wq[q]))
                } else {
                    D::step(chain, wq[q], yq)
                };
                if chain_ends(q, 8, span) {
                    dots = _mm256_add_epi32(dots, D::widen(chain));
                    chain = _mm256_setzero_si256();
                }
            }
            if B::EXCESS != 0 && !by_magnitude {
                dots = _mm256_sub_epi32(dots, load(x.offsets.as_ptr()));
            }
            let scale = _mm256_mul_ps(wd, _mm256_load_ps(x.d.as_ptr()));
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc[k]);
            if B::STORED_MIN {
                let m = _mm256_set1_ps(f32_of(block.m_bits()));
                acc[k] = _mm256_fmadd_ps(m, _mm256_load_ps(x.ds.as_ptr()), acc[k]);
            }
        }
    }
    acc
}
