//! How one row of keys or values (a head's vector at one position) is stored: f32, f16, or
//! 8-bit blocks of 32 with a scale each (llama.cpp's q8_0, with an f32 scale so that a
//! vector load needs no conversion of it). Attention reads rows through these, converting
//! eight values at a time to f32 in registers; the cache never holds f32 copies.

use half::f16;

use super::page::Plain;

/// Values per scale in the 8-bit rows.
pub const Q8_BLOCK: usize = 32;

/// A row format: `units(d)` storage units hold one row of `d` values.
pub trait Element: Send + Sync + 'static {
    type Unit: Plain;

    /// Storage units per row of `d` values.
    fn units(d: usize) -> usize;

    /// Stores `src` (one row) into `dst` (`units(src.len())` units).
    fn encode(src: &[f32], dst: &mut [Self::Unit]);

    /// The row `src` of `dst.len()` values, as f32 (the portable path).
    fn decode(src: &[Self::Unit], dst: &mut [f32]);

    /// Values `c..c + 8` of the row at `row` of `d` values.
    ///
    /// Safety: the CPU has AVX2, FMA and F16C; `row` points at a whole row; `c + 8 <= d` and
    /// `c` is a multiple of 8.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(row: *const Self::Unit, d: usize, c: usize) -> std::arch::x86_64::__m256;

    /// Values `c..c + 16`, as `load8` takes eight.
    ///
    /// Safety: as `load8`'s, on a CPU with AVX-512F too, and with 16 for 8.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(row: *const Self::Unit, d: usize, c: usize) -> std::arch::x86_64::__m512;
}

pub struct F32;
pub struct F16;
pub struct Q8;

impl Element for F32 {
    type Unit = f32;

    fn units(d: usize) -> usize {
        d
    }

    fn encode(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    fn decode(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(row: *const f32, _d: usize, c: usize) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(row.add(c))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(row: *const f32, _d: usize, c: usize) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(row.add(c))
    }
}

/// Stored as the bits (`u16`): a zeroed `Vec<u16>` comes from the allocator's zeroed pages,
/// where a `Vec<f16>` would be written through at allocation.
impl Element for F16 {
    type Unit = u16;

    fn units(d: usize) -> usize {
        d
    }

    fn encode(src: &[f32], dst: &mut [u16]) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        // `half` converts slices with F16C where the CPU has it (round to nearest even).
        dst.reinterpret_cast_mut::<f16>()
            .convert_from_f32_slice(src);
    }

    fn decode(src: &[u16], dst: &mut [f32]) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        src.reinterpret_cast::<f16>().convert_to_f32_slice(dst);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(row: *const u16, _d: usize, c: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(row.add(c).cast()))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(row: *const u16, _d: usize, c: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(row.add(c).cast()))
    }
}

/// A row is its `ceil(d / 32)` f32 scales, then its `d` 8-bit values (as bytes: the scales
/// are read unaligned), so a row is one contiguous run like the other formats.
impl Element for Q8 {
    type Unit = u8;

    fn units(d: usize) -> usize {
        4 * d.div_ceil(Q8_BLOCK) + d
    }

    fn encode(src: &[f32], dst: &mut [u8]) {
        let (scales, values) = dst.split_at_mut(4 * src.len().div_ceil(Q8_BLOCK));
        for ((block, scale), out) in src
            .chunks(Q8_BLOCK)
            .zip(scales.chunks_exact_mut(4))
            .zip(values.chunks_mut(Q8_BLOCK))
        {
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = amax / 127.0;
            // A subnormal scale's inverse can overflow: such a block is stored as zeros.
            let inverse = if d.is_normal() { 1.0 / d } else { 0.0 };
            scale.copy_from_slice(&d.to_le_bytes());
            for (o, &x) in out.iter_mut().zip(block) {
                // |x · inverse| <= 127; `as` saturates NaN to 0.
                *o = ((x * inverse).round() as i8) as u8;
            }
        }
    }

    fn decode(src: &[u8], dst: &mut [f32]) {
        let (scales, values) = src.split_at(4 * dst.len().div_ceil(Q8_BLOCK));
        for ((out, scale), block) in dst
            .chunks_mut(Q8_BLOCK)
            .zip(scales.chunks_exact(4))
            .zip(values.chunks(Q8_BLOCK))
        {
            let d = f32::from_le_bytes([scale[0], scale[1], scale[2], scale[3]]);
            for (o, &q) in out.iter_mut().zip(block) {
                *o = d * f32::from(q as i8);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(row: *const u8, d: usize, c: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let (scale, values) = q8_at(row, d, c);
        let q = _mm_loadl_epi64(values.cast());
        _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)),
            _mm256_set1_ps(scale),
        )
    }

    /// Sixteen values at a multiple of 16 lie in one block of 32: one scale.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(row: *const u8, d: usize, c: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let (scale, values) = q8_at(row, d, c);
        let q = _mm_loadu_si128(values.cast());
        _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)),
            _mm512_set1_ps(scale),
        )
    }
}

/// Value `c`'s block scale and address in a `Q8` row of `d` values.
///
/// Safety: `row` points at a whole row and `c < d`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q8_at(row: *const u8, d: usize, c: usize) -> (f32, *const u8) {
    let blocks = d.div_ceil(Q8_BLOCK);
    let scale = row.add(4 * (c / Q8_BLOCK)).cast::<f32>().read_unaligned();
    (scale, row.add(4 * blocks + c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(d: usize) -> Vec<f32> {
        (0..d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect()
    }

    fn round_trip<E: Element>(src: &[f32]) -> Vec<f32> {
        let mut units = vec![E::Unit::default(); E::units(src.len())];
        E::encode(src, &mut units);
        let mut out = vec![0f32; src.len()];
        E::decode(&units, &mut out);
        out
    }

    #[test]
    fn rows_round_trip_within_their_precision() {
        for d in [8, 40, 96] {
            let src = row(d);
            assert_eq!(round_trip::<F32>(&src), src);
            for (a, b) in src.iter().zip(round_trip::<F16>(&src)) {
                assert!((a - b).abs() <= a.abs() / 2048.0, "{a} vs {b}");
            }
            // Each value within half a step of its block's scale.
            for (block, got) in src.chunks(32).zip(round_trip::<Q8>(&src).chunks(32)) {
                let step = block.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                for (a, b) in block.iter().zip(got) {
                    assert!((a - b).abs() <= step * 0.5001, "{a} vs {b}");
                }
            }
        }
        // A block of zeros has scale 0 and decodes to zeros, not NaN.
        assert_eq!(round_trip::<Q8>(&[0.0; 32]), vec![0.0; 32]);
    }

    #[cfg(target_arch = "x86_64")]
    fn loads_match<E: Element>(src: &[f32]) {
        let mut units = vec![E::Unit::default(); E::units(src.len())];
        E::encode(src, &mut units);
        let mut decoded = vec![0f32; src.len()];
        E::decode(&units, &mut decoded);
        for c in (0..src.len()).step_by(8) {
            let mut got = [0f32; 8];
            // SAFETY: the caller checked the CPU; c + 8 <= d.
            unsafe {
                let v = E::load8(units.as_ptr(), src.len(), c);
                std::arch::x86_64::_mm256_storeu_ps(got.as_mut_ptr(), v);
            }
            assert_eq!(got, decoded[c..c + 8], "column {c}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_loads_equal_the_portable_decoding() {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx2") && has!("fma") && has!("f16c")) {
            return;
        }
        for d in [8, 40, 96] {
            let src = row(d);
            loads_match::<F32>(&src);
            loads_match::<F16>(&src);
            loads_match::<Q8>(&src);
        }
    }
}
