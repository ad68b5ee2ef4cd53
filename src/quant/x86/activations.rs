//! The activations' side of the x86 products: quantizing f32 rows to Q8_K and Q8_0 blocks, and
//! transposing the tiles' (weight rows, activation rows) results into the output.

use std::arch::x86_64::*;

use half::f16;

use super::super::blocks::BlockQ8K;
use super::super::legacy::{BlockQ8_0, QK};

/// `blocks::quantize_q8k` with AVX2, with identical results: the same scale, and rounding
/// half away from zero done exactly (truncate, then step out where the remainder is ≥ ½).
///
/// Safety: the CPU must have AVX2 and FMA (`has_avx2`); `xs.len() == out.len() * 256`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8k(xs: &[f32], out: &mut [BlockQ8K]) {
    let sign_bit = _mm256_set1_ps(-0.0);
    // packs interleave 128-bit lanes; this puts the 32 bytes back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (x, block) in xs
        .chunks_exact(super::super::blocks::QK_K)
        .zip(out.iter_mut())
    {
        let mut amax = _mm256_setzero_ps();
        for i in 0..32 {
            let v = _mm256_loadu_ps(x.as_ptr().add(8 * i));
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v));
        }
        let amax = hmax(amax);
        if amax == 0.0 {
            block.d = 0.0;
            block.qs.fill(0);
            block.bsums.fill(0);
            continue;
        }
        // As Candle: the scale's sign is that of the first value of largest magnitude.
        let max = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
        let iscale = -127f32 / max;
        let scale = _mm256_set1_ps(iscale);
        for i in 0..8 {
            let mut ints = [_mm256_setzero_si256(); 4];
            for (k, int) in ints.iter_mut().enumerate() {
                let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(32 * i + 8 * k)), scale);
                *int = _mm256_cvttps_epi32(round_half_away(v, sign_bit));
            }
            // Sums of each 16 values, before the saturating packs (which clamp to i8).
            for (h, pair) in ints.chunks_exact(2).enumerate() {
                let s = _mm256_add_epi32(pair[0], pair[1]);
                let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
                let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
                block.bsums[2 * i + h] = _mm_cvtsi128_si32(s) as i16;
            }
            let words = _mm256_packs_epi16(
                _mm256_packs_epi32(ints[0], ints[1]),
                _mm256_packs_epi32(ints[2], ints[3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(words, order);
            _mm256_storeu_si256(block.qs.as_mut_ptr().add(32 * i) as *mut __m256i, bytes);
        }
        block.d = 1.0 / iscale;
    }
}

/// `legacy::quantize_q8_0` with AVX2, with identical blocks (for any input, NaN and
/// infinities too): the same scale, and rounding half away from zero done exactly.
///
/// Safety: the CPU must have AVX2, FMA and F16C (`has_avx2`); `xs.len() == out.len() * 32`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8_0(xs: &[f32], out: &mut [BlockQ8_0]) {
    let sign_bit = _mm256_set1_ps(-0.0);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (x, block) in xs.chunks_exact(QK).zip(out.iter_mut()) {
        let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(x.as_ptr().add(8 * k)));
        let mut amax = _mm256_setzero_ps();
        for v in v {
            // |v| first: `max` returns its second operand (amax) where either is NaN, so a
            // NaN is passed over as `f32::max` does.
            amax = _mm256_max_ps(_mm256_andnot_ps(sign_bit, v), amax);
        }
        let d = hmax(amax) / 127.0;
        let inverse = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        block.d = f16::from_f32(d);
        let ints = v.map(|v| {
            let v = _mm256_mul_ps(v, inverse);
            let r = round_half_away(v, sign_bit);
            // As `as i8` saturates (NaN to 0): clamped (a NaN passes through), then NaN
            // lanes zeroed.
            let r = _mm256_min_ps(_mm256_set1_ps(127.0), r);
            let r = _mm256_max_ps(_mm256_set1_ps(-128.0), r);
            let r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q));
            _mm256_cvttps_epi32(r)
        });
        let words = _mm256_packs_epi16(
            _mm256_packs_epi32(ints[0], ints[1]),
            _mm256_packs_epi32(ints[2], ints[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(words, order);
        _mm256_storeu_si256(block.qs.as_mut_ptr() as *mut __m256i, bytes);
    }
}

/// Each lane rounded half away from zero, exactly: truncated, then one step out where the
/// remainder is at least ½.
#[inline(always)]
unsafe fn round_half_away(v: __m256, sign_bit: __m256) -> __m256 {
    let t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    let rest = _mm256_andnot_ps(sign_bit, _mm256_sub_ps(v, t));
    let step = _mm256_and_ps(
        _mm256_cmp_ps(rest, _mm256_set1_ps(0.5), _CMP_GE_OQ),
        _mm256_set1_ps(1.0),
    );
    _mm256_add_ps(t, _mm256_or_ps(step, _mm256_and_ps(v, sign_bit)))
}

#[inline(always)]
unsafe fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

/// `dst[i * dst_stride + j] = src[j * m + i]` for every element of `src` (rows of `m`), in
/// 8×8 blocks through registers.
///
/// Safety: the CPU must have AVX2 (`has_avx2`); `dst` is valid for those writes.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn transpose(src: &[f32], m: usize, dst: *mut f32, dst_stride: usize) {
    let n = src.len() / m;
    debug_assert!(m > 0 && src.len().is_multiple_of(m) && n <= dst_stride);
    let (n8, m8) = (n / 8 * 8, m / 8 * 8);
    let s = src.as_ptr();
    for j in (0..n8).step_by(8) {
        for i in (0..m8).step_by(8) {
            let r: [__m256; 8] = std::array::from_fn(|k| _mm256_loadu_ps(s.add((j + k) * m + i)));
            let t: [__m256; 8] = std::array::from_fn(|k| {
                let (a, b) = (r[k / 2 * 2], r[k / 2 * 2 + 1]);
                if k % 2 == 0 {
                    _mm256_unpacklo_ps(a, b)
                } else {
                    _mm256_unpackhi_ps(a, b)
                }
            });
            let u: [__m256; 8] = std::array::from_fn(|k| {
                let base = k / 4 * 4;
                let (a, b) = (t[base + (k % 4) / 2], t[base + 2 + (k % 4) / 2]);
                if k % 2 == 0 {
                    _mm256_shuffle_ps(a, b, 0x44)
                } else {
                    _mm256_shuffle_ps(a, b, 0xEE)
                }
            });
            for k in 0..8 {
                let row = if k < 4 {
                    _mm256_permute2f128_ps(u[k], u[k + 4], 0x20)
                } else {
                    _mm256_permute2f128_ps(u[k - 4], u[k], 0x31)
                };
                _mm256_storeu_ps(dst.add((i + k) * dst_stride + j), row);
            }
        }
    }
    for j in 0..n {
        let from = if j < n8 { m8 } else { 0 };
        for i in from..m {
            *dst.add(i * dst_stride + j) = src[j * m + i];
        }
    }
}
