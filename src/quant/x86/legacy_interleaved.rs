//! Prompt products of the 32-value types, eight activation rows at a time: the rows are
//! interleaved by four values (`BlockQ8_0x8`), so one `vpdpbusd` multiplies four weights,
//! broadcast, with eight rows, and a weight block's eight broadcasts serve up to 32 rows;
//! with AVX-512's 32 registers, each load of the activations serves two weight rows.
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

/// Groups of eight activation rows per pass over one weight row (or two, `run`): their
/// chains, totals and accumulators, with a broadcast weight quad per weight row, fit the
/// sixteen registers (32 with two weight rows).
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
    let n_rows = g.rows.len();
    debug_assert!(g.weights.len() >= n_rows * nb && g.groups.len() == n_groups * nb);
    // Two weight rows at a time where the encoding has 32 registers (EVEX, whose
    // `GroupDot::GROUPS` counts eight groups for that reason): each load of
    // the activations then serves both, where loads bounded the pass. Per pass of an
    // 8192×3072 matrix, 64 rows, on a 2-vCPU Zen 4: Q4_0 11.3 -> 7.9 ms, Q8_0 11.7 -> 7.7,
    // Q4_1 11.1 -> 7.5. With AVX2's 16 registers, two rows (with two groups or four) gained
    // nothing for Q4_0 (13.1 -> 12.6-12.8 ms) and lost for Q8_0 (15.4 -> 16.1-17.1).
    let pair = D::GROUPS >= 8;
    for first in (0..n_groups).step_by(GROUPS) {
        let count = (n_groups - first).min(GROUPS);
        // Unused slots repeat the last group; their sums are not stored.
        let x = |k: usize| g.groups.as_ptr().add((first + k.min(count - 1)) * nb);
        let xs = [x(0), x(1), x(2), x(3)];
        let w = |j: usize| g.weights.as_ptr().add(j * nb);
        let mut j = 0;
        while j < n_rows {
            let rows = if pair && j + 1 < n_rows { 2 } else { 1 };
            macro_rules! by_count {
                ($r:literal, $w:expr) => {
                    match count {
                        1 => widen(pass::<D, B, $r, 1>($w, &xs, nb)),
                        2 => widen(pass::<D, B, $r, 2>($w, &xs, nb)),
                        3 => widen(pass::<D, B, $r, 3>($w, &xs, nb)),
                        _ => widen(pass::<D, B, $r, 4>($w, &xs, nb)),
                    }
                };
            }
            let sums = match rows {
                2 => by_count!(2, [w(j), w(j + 1)]),
                _ => by_count!(1, [w(j)]),
            };
            for (dj, sums) in sums.iter().enumerate().take(rows) {
                for (k, sums) in sums.iter().enumerate().take(count) {
                    let mut lanes = [0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), *sums);
                    for (r, &v) in lanes.iter().enumerate() {
                        *g.out
                            .at((8 * (first + k) + r) * g.stride + g.rows.start + j + dj) = v;
                    }
                }
            }
            j += rows;
        }
    }
}

/// The R × G sums in the corner of a full-size array.
#[inline(always)]
unsafe fn widen<const R: usize, const G: usize>(sums: [[__m256; G]; R]) -> [[__m256; GROUPS]; 2] {
    let mut out = [[_mm256_setzero_ps(); GROUPS]; 2];
    for (o, s) in out.iter_mut().zip(sums) {
        o[..G].copy_from_slice(&s);
    }
    out
}

/// R weight rows (`w`, `nb` blocks each) with G groups of eight rows: lane r of sum [j][k]
/// is weight row j with row r of group k. Each (weight row, group) takes the same steps
/// whatever R is: the same bits.
// Indexes: the loops walk the weight rows, the blocks' four-value quads and the groups.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn pass<D: GroupDot, B: LegacyBlock, const R: usize, const G: usize>(
    w: [*const B; R],
    xs: &[*const BlockQ8_0x8; GROUPS],
    nb: usize,
) -> [[__m256; G]; R] {
    // Q8_0's weights, shifted by 128 to be unsigned, reach 255: where a step of those is
    // not exact (`maddubs` would saturate), they go as magnitudes with the activations
    // taking their signs, and the products carry no excess.
    let by_magnitude = B::SIGNED && exact_steps::<D>(255) == 0;
    let span = chain_span::<D>(match (B::SIGNED, by_magnitude) {
        (true, true) => 128,
        (true, false) => 255,
        (false, _) => B::MAX_VALUE,
    });
    let mut acc = [[_mm256_setzero_ps(); G]; R];
    let mut quads = [[0i32; 8]; R];
    let mut magnitudes = [[0i32; 8]; R];
    for b in 0..nb {
        for j in 0..R {
            let mut wv = (*w[j].add(b)).unpack();
            if by_magnitude {
                _mm256_storeu_si256(magnitudes[j].as_mut_ptr().cast(), _mm256_abs_epi8(wv));
            } else if B::SIGNED {
                // w + 128: unsigned, as `vpdpbusd` takes it (the excess is taken off below).
                wv = _mm256_xor_si256(wv, _mm256_set1_epi8(i8::MIN));
            }
            _mm256_storeu_si256(quads[j].as_mut_ptr().cast(), wv);
        }
        // Quads chained while exact (AVX2's i16 lanes: all eight below 16, four below 32,
        // one for Q8_0's magnitudes; VNNI's i32 lanes: all eight), widened to i32.
        let mut dots = [[_mm256_setzero_si256(); G]; R];
        let mut chain = [[_mm256_setzero_si256(); G]; R];
        for q in 0..8 {
            // Weight quad q of each row, broadcast; with the activations' quad q of the
            // eight rows of each group.
            let mut wq = [_mm256_setzero_si256(); R];
            let mut signed = [_mm256_setzero_si256(); R];
            for j in 0..R {
                signed[j] = _mm256_set1_epi32(quads[j][q]);
                wq[j] = match by_magnitude {
                    true => _mm256_set1_epi32(magnitudes[j][q]),
                    false => signed[j],
                };
            }
            for k in 0..G {
                let yq = load((*xs[k].add(b)).qs.as_ptr().add(32 * q));
                for j in 0..R {
                    chain[j][k] = if by_magnitude {
                        // |w| · (y with w's sign) = w · y.
                        D::step(chain[j][k], wq[j], _mm256_sign_epi8(yq, signed[j]))
                    } else {
                        D::step(chain[j][k], wq[j], yq)
                    };
                    if chain_ends(q, 8, span) {
                        dots[j][k] = _mm256_add_epi32(dots[j][k], D::widen(chain[j][k]));
                        chain[j][k] = _mm256_setzero_si256();
                    }
                }
            }
        }
        for j in 0..R {
            let block = &*w[j].add(b);
            let wd = _mm256_set1_ps(f32_of(block.d()));
            for k in 0..G {
                let x = &*xs[k].add(b);
                let mut dots = dots[j][k];
                if B::EXCESS != 0 && !by_magnitude {
                    dots = _mm256_sub_epi32(dots, load(x.offsets.as_ptr()));
                }
                let scale = _mm256_mul_ps(wd, _mm256_load_ps(x.d.as_ptr()));
                acc[j][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc[j][k]);
                if B::STORED_MIN {
                    let m = _mm256_set1_ps(f32_of(block.m_bits()));
                    acc[j][k] = _mm256_fmadd_ps(m, _mm256_load_ps(x.ds.as_ptr()), acc[j][k]);
                }
            }
        }
    }
    acc
}
