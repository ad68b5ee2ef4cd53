//! Q4_0 rows repacked eight to a block (`BlockQ4_0x8`) times Q8_0 activation rows: a block's
//! four vectors of packed nibbles unpack once for every activation row, each meets the
//! row's four values broadcast, and the eight rows' exact totals come out as the lanes of
//! one vector, scaled there together. Each lane takes the steps the file's layout takes per
//! block (`legacy_tiles::eight_rows`: the exact total, plus the offset term, converted and
//! multiplied by the two scales in one fused step), so the results are the same bits.

use std::arch::x86_64::*;

use super::super::super::legacy::BlockQ8_0;
use super::super::super::repacked::{BlockQ4_0x8, ROWS};
use super::super::group_dot::{Evex, GroupDot, Vex};
use super::super::k_groups::broadcast;
use super::super::{load, nibbles, Avx2};
use super::prefetch_ahead;

/// Activation rows one pass over the weights serves: each holds its sums in a register.
const PASS_ROWS: usize = 8;

/// One activation row's Q8_0 blocks with each block's scale (as f32) and offset term (−8 ·
/// Σ q), as `LegacyMatrix` makes them.
#[derive(Clone, Copy)]
pub struct Q8_0Row<'a> {
    pub blocks: &'a [BlockQ8_0],
    pub scales: &'a [f32],
    pub offsets: &'a [i32],
}

/// `out[i]` = the eight rows of `blocks` times `acts[i]`, with AVX2.
///
/// Safety: the CPU has AVX2, FMA and F16C; every row of `acts` holds at least `blocks.len()`
/// blocks, scales and offsets; `out` is as long as `acts`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn repacked_q4_0_avx2(
    blocks: &[BlockQ4_0x8],
    acts: &[Q8_0Row<'_>],
    out: &mut [[f32; ROWS]],
) {
    passes::<Avx2>(blocks, acts, out)
}

/// As `repacked_q4_0_avx2`, with AVX-VNNI.
///
/// Safety: as for `repacked_q4_0_avx2`, on a CPU with `has_avx_vnni`.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn repacked_q4_0_avx_vnni(
    blocks: &[BlockQ4_0x8],
    acts: &[Q8_0Row<'_>],
    out: &mut [[f32; ROWS]],
) {
    passes::<Vex>(blocks, acts, out)
}

/// As `repacked_q4_0_avx2`, with AVX-512 VNNI's encoding.
///
/// Safety: as for `repacked_q4_0_avx2`, on a CPU with `has_avx512_vnni`.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub unsafe fn repacked_q4_0_avx512_vnni(
    blocks: &[BlockQ4_0x8],
    acts: &[Q8_0Row<'_>],
    out: &mut [[f32; ROWS]],
) {
    passes::<Evex>(blocks, acts, out)
}

#[inline(always)]
unsafe fn passes<D: GroupDot>(
    blocks: &[BlockQ4_0x8],
    acts: &[Q8_0Row<'_>],
    out: &mut [[f32; ROWS]],
) {
    debug_assert!(acts.len() == out.len());
    debug_assert!(acts.iter().all(|a| a.blocks.len() >= blocks.len()
        && a.scales.len() >= blocks.len()
        && a.offsets.len() >= blocks.len()));
    let mut first = 0;
    while first < acts.len() {
        let n = (acts.len() - first).min(PASS_ROWS);
        let (acts, out) = (&acts[first..], &mut out[first..]);
        match n {
            8 => pass::<D, 8>(blocks, acts, out),
            7 => pass::<D, 7>(blocks, acts, out),
            6 => pass::<D, 6>(blocks, acts, out),
            5 => pass::<D, 5>(blocks, acts, out),
            4 => pass::<D, 4>(blocks, acts, out),
            3 => pass::<D, 3>(blocks, acts, out),
            2 => pass::<D, 2>(blocks, acts, out),
            _ => pass::<D, 1>(blocks, acts, out),
        }
        first += n;
    }
}

/// The first R activation rows over all of `blocks`.
// Indexes: the loops walk the activation rows' registers.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn pass<D: GroupDot, const R: usize>(
    blocks: &[BlockQ4_0x8],
    acts: &[Q8_0Row<'_>],
    out: &mut [[f32; ROWS]],
) {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut w = [(_mm256_setzero_si256(), _mm256_setzero_si256()); 4];
    for (b, x) in blocks.iter().enumerate() {
        prefetch_ahead(x);
        // A loop, not `array::from_fn`: a closure would not inherit the target features.
        for (c, w) in w.iter_mut().enumerate() {
            *w = nibbles(load(x.qs[c].as_ptr()), false);
        }
        let wd = _mm256_cvtph_ps(_mm_loadu_si128(x.d.as_ptr() as *const __m128i));
        for i in 0..R {
            let act = acts.get_unchecked(i);
            let y = act.blocks.get_unchecked(b).qs.as_ptr() as *const u8;
            let mut total = _mm256_setzero_si256();
            for (c, (low, high)) in w.iter().enumerate() {
                total = D::dot_acc(total, *low, broadcast::<4>(y.add(4 * c)));
                total = D::dot_acc(total, *high, broadcast::<4>(y.add(16 + 4 * c)));
            }
            total = _mm256_add_epi32(total, _mm256_set1_epi32(*act.offsets.get_unchecked(b)));
            let scale = _mm256_mul_ps(wd, _mm256_set1_ps(*act.scales.get_unchecked(b)));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), scale, acc[i]);
        }
    }
    for i in 0..R {
        _mm256_storeu_ps(out[i].as_mut_ptr(), acc[i]);
    }
}
