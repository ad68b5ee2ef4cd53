//! Q4_0 and Q8_0 rows repacked eight to a block (`BlockQ4_0x8`, `BlockQ8_0R8`) times Q8_0
//! activation rows: a block's vectors unpack once for every activation row, each meets the
//! row's four values broadcast, and the eight rows' exact totals come out as the lanes of
//! one vector, scaled there together. Each lane takes the steps the file's layout takes per
//! block (`legacy_tiles::eight_rows`: the exact total, converted and multiplied by the two
//! scales in one fused step), so the results are the same bits.
//!
//! Q8_0's values are signed, and `vpdpbusd` and `maddubs` take one unsigned operand. VNNI
//! multiplies the weights shifted by +128 and takes 128 · Σ q off each total, as Q4_0's
//! nibbles take 8 · Σ q; AVX2's `maddubs` would saturate its i16 pairs on 255 · 127 · 2, so it
//! multiplies the weights' magnitudes (at most 128) by the activations with the weights'
//! signs, at most 128 · 127 · 2 = 32,512.

use std::arch::x86_64::*;

use super::super::super::legacy::BlockQ8_0;
use super::super::super::repacked::{BlockQ4_0x8, BlockQ8_0R8, ROWS};
use super::super::group_dot::{Evex, GroupDot, Vex};
use super::super::k_groups::broadcast;
use super::super::{load, nibbles, Avx2};
use super::prefetch_ahead;

/// Activation rows one pass over the weights serves: each holds its sums in a register.
const PASS_ROWS: usize = 8;

/// One activation row's Q8_0 blocks with each block's scale (as f32) and Σ q.
#[derive(Clone, Copy)]
pub struct Q8_0Row<'a> {
    pub blocks: &'a [BlockQ8_0],
    pub scales: &'a [f32],
    pub sums: &'a [i32],
}

/// A repacked block of eight rows of a 32-value type, as the kernels below take it.
pub trait LegacyRows: Sync {
    /// The block's vectors, unpacked once for every activation row of a pass.
    type Unpacked: Copy;
    /// What each activation block's Σ q is multiplied by and added to `dot`'s totals.
    fn offset<D: GroupDot>() -> i32;
    /// The eight rows' scales.
    fn scales(&self) -> &[half::f16; ROWS];
    unsafe fn unpack<D: GroupDot>(&self) -> Self::Unpacked;
    /// Σ w · y per row (lane), less `offset` · Σ y, for an activation block's values `y`.
    unsafe fn dot<D: GroupDot>(w: &Self::Unpacked, y: *const u8) -> __m256i;
}

impl LegacyRows for BlockQ4_0x8 {
    /// Low and high nibbles of each of the four vectors.
    type Unpacked = [(__m256i, __m256i); 4];

    fn offset<D: GroupDot>() -> i32 {
        -8
    }

    fn scales(&self) -> &[half::f16; ROWS] {
        &self.d
    }

    #[inline(always)]
    unsafe fn unpack<D: GroupDot>(&self) -> Self::Unpacked {
        let mut w = [(_mm256_setzero_si256(), _mm256_setzero_si256()); 4];
        // A loop, not `array::from_fn`: a closure would not inherit the target features.
        for (c, w) in w.iter_mut().enumerate() {
            *w = nibbles(load(self.qs[c].as_ptr()), false);
        }
        w
    }

    #[inline(always)]
    unsafe fn dot<D: GroupDot>(w: &Self::Unpacked, y: *const u8) -> __m256i {
        let mut total = _mm256_setzero_si256();
        for (c, (low, high)) in w.iter().enumerate() {
            total = D::dot_acc(total, *low, broadcast::<4>(y.add(4 * c)));
            total = D::dot_acc(total, *high, broadcast::<4>(y.add(16 + 4 * c)));
        }
        total
    }
}

/// Whether `D`'s products chain into i32 lanes (VNNI), which take Q8_0's weights shifted to
/// unsigned; else AVX2's `maddubs` takes their magnitudes.
fn shifted<D: GroupDot>() -> bool {
    D::CHAIN_MAX == i32::MAX
}

impl LegacyRows for BlockQ8_0R8 {
    /// Each vector shifted by +128 (VNNI), or its magnitudes and the values for their signs.
    type Unpacked = [(__m256i, __m256i); 8];

    fn offset<D: GroupDot>() -> i32 {
        if shifted::<D>() {
            -128
        } else {
            0
        }
    }

    fn scales(&self) -> &[half::f16; ROWS] {
        &self.d
    }

    #[inline(always)]
    unsafe fn unpack<D: GroupDot>(&self) -> Self::Unpacked {
        let mut w = [(_mm256_setzero_si256(), _mm256_setzero_si256()); 8];
        for (c, w) in w.iter_mut().enumerate() {
            let values = load(self.qs[c].as_ptr());
            *w = if shifted::<D>() {
                (_mm256_xor_si256(values, _mm256_set1_epi8(-128)), values)
            } else {
                (_mm256_abs_epi8(values), values)
            };
        }
        w
    }

    #[inline(always)]
    unsafe fn dot<D: GroupDot>(w: &Self::Unpacked, y: *const u8) -> __m256i {
        let mut total = _mm256_setzero_si256();
        for (c, (unsigned, values)) in w.iter().enumerate() {
            let y = broadcast::<4>(y.add(4 * c));
            let y = if shifted::<D>() {
                y
            } else {
                _mm256_sign_epi8(y, *values)
            };
            total = D::dot_acc(total, *unsigned, y);
        }
        total
    }
}

/// `out[i]` = the eight rows of `blocks` times `acts[i]`, with AVX2.
///
/// Safety: the CPU has AVX2, FMA and F16C; every row of `acts` holds at least `blocks.len()`
/// blocks, scales and sums; `out` is as long as `acts`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn repacked_legacy_avx2<T: LegacyRows>(
    blocks: &[T],
    acts: &[Q8_0Row<'_>],
    out: &mut [[f32; ROWS]],
) {
    passes::<Avx2, T>(blocks, acts, out)
}

/// As `repacked_legacy_avx2`, with AVX-VNNI.
///
/// Safety: as for `repacked_legacy_avx2`, on a CPU with `has_avx_vnni`.
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn repacked_legacy_avx_vnni<T: LegacyRows>(
    blocks: &[T],
    acts: &[Q8_0Row<'_>],
    out: &mut [[f32; ROWS]],
) {
    passes::<Vex, T>(blocks, acts, out)
}

/// As `repacked_legacy_avx2`, with AVX-512 VNNI's encoding.
///
/// Safety: as for `repacked_legacy_avx2`, on a CPU with `has_avx512_vnni`.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub unsafe fn repacked_legacy_avx512_vnni<T: LegacyRows>(
    blocks: &[T],
    acts: &[Q8_0Row<'_>],
    out: &mut [[f32; ROWS]],
) {
    passes::<Evex, T>(blocks, acts, out)
}

#[inline(always)]
unsafe fn passes<D: GroupDot, T: LegacyRows>(
    blocks: &[T],
    acts: &[Q8_0Row<'_>],
    out: &mut [[f32; ROWS]],
) {
    debug_assert!(acts.len() == out.len());
    debug_assert!(acts.iter().all(|a| a.blocks.len() >= blocks.len()
        && a.scales.len() >= blocks.len()
        && a.sums.len() >= blocks.len()));
    let mut first = 0;
    while first < acts.len() {
        let n = (acts.len() - first).min(PASS_ROWS);
        let (acts, out) = (&acts[first..], &mut out[first..]);
        match n {
            8 => pass::<D, T, 8>(blocks, acts, out),
            7 => pass::<D, T, 7>(blocks, acts, out),
            6 => pass::<D, T, 6>(blocks, acts, out),
            5 => pass::<D, T, 5>(blocks, acts, out),
            4 => pass::<D, T, 4>(blocks, acts, out),
            3 => pass::<D, T, 3>(blocks, acts, out),
            2 => pass::<D, T, 2>(blocks, acts, out),
            _ => pass::<D, T, 1>(blocks, acts, out),
        }
        first += n;
    }
}

/// The first R activation rows over all of `blocks`.
// Indexes: the loops walk the activation rows' registers.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn pass<D: GroupDot, T: LegacyRows, const R: usize>(
    blocks: &[T],
    acts: &[Q8_0Row<'_>],
    out: &mut [[f32; ROWS]],
) {
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, x) in blocks.iter().enumerate() {
        prefetch_ahead(x);
        let w = x.unpack::<D>();
        let wd = _mm256_cvtph_ps(_mm_loadu_si128(x.scales().as_ptr() as *const __m128i));
        for i in 0..R {
            let act = acts.get_unchecked(i);
            let y = act.blocks.get_unchecked(b).qs.as_ptr() as *const u8;
            let mut total = T::dot::<D>(&w, y);
            let offset = T::offset::<D>() * *act.sums.get_unchecked(b);
            total = _mm256_add_epi32(total, _mm256_set1_epi32(offset));
            let scale = _mm256_mul_ps(wd, _mm256_set1_ps(*act.scales.get_unchecked(b)));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), scale, acc[i]);
        }
    }
    for i in 0..R {
        _mm256_storeu_ps(out[i].as_mut_ptr(), acc[i]);
    }
}
