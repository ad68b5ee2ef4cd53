//! How a kernel set multiplies u8 weights with i8 activations, for every x86 kernel of the
//! quantized types (`k_groups.rs`, `legacy_tiles.rs`, `legacy_interleaved.rs`): VNNI's
//! `vpdpbusd` in its two encodings (one build each), or AVX2's `maddubs` into 16-bit lanes
//! summed there for as many steps as stay exact; and how a sub-block's scale then applies.

use std::arch::x86_64::*;

use super::{has_avx2, load, Avx2, MulAdd};

pub fn has_avx_vnni() -> bool {
    has_avx2() && is_x86_feature_detected!("avxvnni")
}

/// The same 256-bit `vpdpbusd`, EVEX-encoded: CPUs with AVX-512 VNNI but no AVX-VNNI (some
/// Zen 4 and Ice Lake / Cascade Lake servers, and virtual machines that hide AVX-VNNI); and
/// prompts' tiles in 512-bit registers (`wide.rs`).
pub fn has_avx512_vnni() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// How a kernel set multiplies u8 weights with i8 activations, four per i32 lane. The
/// grouped kernels chain steps over a sub-block, and `add_scaled` adds the chains, times
/// their sub-blocks' scales, to the exact i32 totals. VNNI's chain is `vpdpbusd` into i32
/// lanes. AVX2's is `maddubs` into i16 lanes (two products each), added with `add_epi16`
/// for as many steps as stay exact (`chain_span`), then one `madd` by the scale: where the
/// row-by-row tiles take a `maddubs`, a `madd` and an `add` per 32 values and row (`dot`),
/// this takes a `maddubs` and an `add_epi16`, and the scale's `madd` once per sub-block
/// (Q4_K) or per few steps.
pub trait GroupDot: MulAdd {
    /// Interleaved groups that one unpacking of a weight block serves: their two chains
    /// and total each take a register; VEX encodes 16 ymm registers, EVEX 32.
    const GROUPS: usize;
    /// The largest magnitude a chain's lane holds exactly.
    const CHAIN_MAX: i32 = i32::MAX;
    /// Products a step adds to each of a chain's lanes.
    const STEP_PRODUCTS: i32 = 4;
    /// `chain` + the products of `a` (u8) and `b` (i8), per lane.
    unsafe fn step(chain: __m256i, a: __m256i, b: __m256i) -> __m256i;
    /// A chain's lanes as i32 lanes of the same total.
    #[inline(always)]
    unsafe fn widen(chain: __m256i) -> __m256i {
        chain
    }
    /// `acc` + Σ4 a·b per i32 lane, for operands whose single step is exact.
    #[inline(always)]
    unsafe fn dot_acc(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        if Self::CHAIN_MAX == i32::MAX {
            Self::step(acc, a, b)
        } else {
            _mm256_add_epi32(acc, Self::widen(Self::step(_mm256_setzero_si256(), a, b)))
        }
    }
    /// Σ4 a·b per i32 lane.
    #[inline(always)]
    unsafe fn dot(a: __m256i, b: __m256i) -> __m256i {
        Self::dot_acc(_mm256_setzero_si256(), a, b)
    }
    /// `total += lo·scale_lo + hi·scale_hi` per i32 lane, exact, with the two sub-blocks'
    /// scales as the i16 halves of each of `pair`'s lanes (`scale_pair`). `fit_i16`: every
    /// lane of the chains fits an i16.
    #[inline(always)]
    unsafe fn add_scaled<const G: usize>(
        total: &mut [__m256i; G],
        lo: &[__m256i; G],
        hi: &[__m256i; G],
        pair: __m256i,
        fit_i16: bool,
    ) {
        add_scaled_i32::<Self, G>(total, lo, hi, pair, fit_i16)
    }
}

/// Steps a chain of `V` takes exactly with weights up to `max_weight` (activations are at
/// most 128 in magnitude): AVX2's i16 lanes take eight with Q4_K's 4-bit values, four with
/// Q5_K's, two with Q6_K's, none with Q8_0's shifted to 255; VNNI's i32 lanes, any number.
#[inline(always)]
pub(super) fn exact_steps<V: GroupDot>(max_weight: i32) -> i32 {
    V::CHAIN_MAX / (V::STEP_PRODUCTS * max_weight * 128)
}

/// The steps a chain runs before it is widened: as many as stay exact, at least one (a
/// single step, widened at once, is exact whenever its pairs do not saturate).
#[inline(always)]
pub(super) fn chain_span<V: GroupDot>(max_weight: i32) -> usize {
    exact_steps::<V>(max_weight).max(1) as usize
}

/// Whether step k (of `steps`) ends a chain of `span` steps.
#[inline(always)]
pub(super) fn chain_ends(k: usize, steps: usize, span: usize) -> bool {
    (k + 1).is_multiple_of(span) || k + 1 == steps
}

/// VEX-encoded (AVX-VNNI).
pub struct Vex;

/// EVEX-encoded (AVX-512 VNNI with VL), on 256-bit registers.
pub struct Evex;

impl MulAdd for Vex {
    #[inline(always)]
    unsafe fn mul_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpwssd_avx_epi32(acc, a, b)
    }
}

impl MulAdd for Evex {
    #[inline(always)]
    unsafe fn mul_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpwssd_epi32(acc, a, b)
    }
}

impl GroupDot for Vex {
    const GROUPS: usize = 4;
    #[inline(always)]
    unsafe fn step(chain: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(chain, a, b)
    }
}

impl GroupDot for Evex {
    const GROUPS: usize = 8;
    #[inline(always)]
    unsafe fn step(chain: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(chain, a, b)
    }
}

/// Without VNNI: chains in i16 lanes (`maddubs` saturates pairs past ±32767: operands whose
/// pairs cannot reach that only), each `madd` by its scale into the i32 totals. Four groups
/// per unpacking, as VEX's: two or three measured 3-20% slower.
impl GroupDot for Avx2 {
    const GROUPS: usize = 4;
    const CHAIN_MAX: i32 = i16::MAX as i32;
    const STEP_PRODUCTS: i32 = 2;
    #[inline(always)]
    unsafe fn step(chain: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi16(chain, _mm256_maddubs_epi16(a, b))
    }
    #[inline(always)]
    unsafe fn widen(chain: __m256i) -> __m256i {
        _mm256_madd_epi16(chain, _mm256_set1_epi16(1))
    }
    #[inline(always)]
    unsafe fn add_scaled<const G: usize>(
        total: &mut [__m256i; G],
        lo: &[__m256i; G],
        hi: &[__m256i; G],
        pair: __m256i,
        _fit_i16: bool,
    ) {
        // Each lane's scales in both its i16 halves (lanes may differ: `x86::repacked`).
        let scale_lo = _mm256_shuffle_epi8(pair, load(SCALE_LO.as_ptr()));
        let scale_hi = _mm256_shuffle_epi8(pair, load(SCALE_HI.as_ptr()));
        for g in 0..G {
            let l = _mm256_madd_epi16(lo[g], scale_lo);
            let h = _mm256_madd_epi16(hi[g], scale_hi);
            total[g] = _mm256_add_epi32(total[g], _mm256_add_epi32(l, h));
        }
    }
}

/// `pshufb` indices: each i32 lane's low (`SCALE_LO`) or high i16 in both its halves.
const SCALE_LO: [u8; 32] = lane_halves(0);
const SCALE_HI: [u8; 32] = lane_halves(2);

const fn lane_halves(half: u8) -> [u8; 32] {
    let mut indices = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        // Within each 128-bit half: byte i of lane i / 4 comes from that lane's `half`.
        indices[i] = (i as u8 % 16) / 4 * 4 + half + (i as u8 % 2);
        i += 1;
    }
    indices
}

/// `total += lo·scale_lo + hi·scale_hi` per lane, exact. With `fit_i16` (every lane of `lo`
/// and `hi` fits an i16) both go as the i16 halves of each lane into one `vpdpwssd` with
/// both scales: a third of the two multiplies and adds.
#[inline(always)]
unsafe fn add_scaled_i32<V: MulAdd + ?Sized, const G: usize>(
    total: &mut [__m256i; G],
    lo: &[__m256i; G],
    hi: &[__m256i; G],
    pair: __m256i,
    fit_i16: bool,
) {
    if fit_i16 {
        for g in 0..G {
            let both = _mm256_blend_epi16::<0xAA>(lo[g], _mm256_slli_epi32::<16>(hi[g]));
            total[g] = V::mul_add(total[g], both, pair);
        }
    } else {
        // Each scale sign-extended to the whole lane.
        let scale_lo = _mm256_srai_epi32::<16>(_mm256_slli_epi32::<16>(pair));
        let scale_hi = _mm256_srai_epi32::<16>(pair);
        for g in 0..G {
            let l = _mm256_mullo_epi32(lo[g], scale_lo);
            let h = _mm256_mullo_epi32(hi[g], scale_hi);
            total[g] = _mm256_add_epi32(total[g], _mm256_add_epi32(l, h));
        }
    }
}

/// Sub-block scales `i16s` (two per i32 lane, as `_mm256_cvtepu8_epi16` or
/// `_mm256_cvtepi8_epi16` widen a block's bytes) as `add_scaled`'s pair for lane `p`: that
/// lane in every lane, one shuffle, where building it from scalars took a dozen
/// instructions per sub-block pair.
#[inline(always)]
pub(super) unsafe fn scale_pair(i16s: __m256i, p: usize) -> __m256i {
    _mm256_permutevar8x32_epi32(i16s, _mm256_set1_epi32(p as i32))
}
