//! x86 products of K-quant weight rows with Q8_K activation rows, in two builds chosen at
//! run time: AVX2, and AVX2 with AVX-VNNI (`vpdpwssd` fuses the scale multiply and the add).
//!
//! The weights are read in the file's own block layout (no repacked copy). Each 32 values
//! take one `maddubs` (unsigned weight × signed activation, pairs summed to i16) and one
//! multiply-add by the sub-block scale (to i32). A tile of weight rows meets a tile of
//! activation rows one 256-value block column at a time: that column's activations stay in
//! L1 for all the tile's weight rows; four activation rows share each unpacking of a weight
//! block, and their four sums are reduced and scaled together.

use std::arch::x86_64::*;

use super::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};

/// Weight rows in a tile.
pub const TILE_ROWS: usize = 8;
/// Activation rows in a tile: 32 × 292 bytes of one block column fit L1 beside the rest.
pub const TILE_ACTS: usize = 32;

pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub fn has_avx_vnni() -> bool {
    has_avx2() && is_x86_feature_detected!("avxvnni")
}

/// `out[j * ys.len() + i] = w[j] · ys[i]`, with AVX2.
///
/// Safety: the CPU must have AVX2, FMA and F16C (`has_avx2`); every row of `w` and `ys` has the
/// same number of blocks; at most `TILE_ROWS` × `TILE_ACTS`; `out` is `w.len() * ys.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_avx2<B: Avx2Block>(w: &[&[B]], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    tile::<Avx2, B>(w, ys, out)
}

/// As `tile_avx2`, with AVX-VNNI (`has_avx_vnni`).
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn tile_avx_vnni<B: Avx2Block>(w: &[&[B]], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    tile::<AvxVnni, B>(w, ys, out)
}

/// The i16 multiply-add into i32 lanes: `acc + madd(a, b)`.
pub trait MulAdd {
    unsafe fn mul_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;
}

pub struct Avx2;
pub struct AvxVnni;

impl MulAdd for Avx2 {
    #[inline(always)]
    unsafe fn mul_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
    }
}

impl MulAdd for AvxVnni {
    #[inline(always)]
    unsafe fn mul_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_dpwssd_avx_epi32(acc, a, b)
    }
}

/// What a weight block contributes besides its values: Σ_r = yd·(d·dots − dm·offsets),
/// where `offsets` = Σ over the activation's 16-value sums (`bsums`) of `offset_weights`.
pub struct Prepared {
    scales: __m256i,
    offset_weights: __m256i,
    d: f32,
    dm: f32,
}

/// A K-quant block that can be multiplied with Q8_K activation blocks.
pub trait Avx2Block {
    unsafe fn prepare(&self) -> Prepared;
    /// Σ scale·q·y over the block for each activation block, as 8 i32 partial sums.
    unsafe fn dots<M: MulAdd, const R: usize>(
        &self,
        p: &Prepared,
        ys: [&BlockQ8K; R],
    ) -> [__m256i; R];
}

#[inline(always)]
unsafe fn load<T>(ptr: *const T) -> __m256i {
    _mm256_loadu_si256(ptr as *const __m256i)
}

/// An f16 as f32, in one instruction (the `half` crate's conversion is a call).
#[inline(always)]
unsafe fn f32_of(h: half::f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits()))))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The lane sums of four vectors, as four floats.
#[inline(always)]
unsafe fn hsum4(v: [__m256i; 4]) -> __m128 {
    let s = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    _mm_cvtepi32_ps(s)
}

#[inline(always)]
unsafe fn offsets(p: &Prepared, y: &BlockQ8K) -> __m256i {
    _mm256_madd_epi16(load(y.bsums.as_ptr()), p.offset_weights)
}

#[inline(always)]
unsafe fn tile<M: MulAdd, B: Avx2Block>(w: &[&[B]], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    let m = ys.len();
    let groups = m / 4;
    let rest = m - 4 * groups;
    // One accumulator per weight row and group of four activation rows (its four outputs),
    // and eight partial sums per weight row and leftover activation row.
    let mut acc4 = [_mm_setzero_ps(); TILE_ROWS * TILE_ACTS / 4];
    let mut acc1 = [_mm256_setzero_ps(); TILE_ROWS * 3];
    let blocks = w.first().map_or(0, |row| row.len());
    for b in 0..blocks {
        for (j, row) in w.iter().enumerate() {
            let x = row.get_unchecked(b);
            let p = x.prepare();
            let y = |i: usize| ys.get_unchecked(i).get_unchecked(b);
            for g in 0..groups {
                let yg = [y(4 * g), y(4 * g + 1), y(4 * g + 2), y(4 * g + 3)];
                let dots = hsum4(x.dots::<M, 4>(&p, yg));
                let offs = hsum4([
                    offsets(&p, yg[0]),
                    offsets(&p, yg[1]),
                    offsets(&p, yg[2]),
                    offsets(&p, yg[3]),
                ]);
                let yd = _mm_set_ps(yg[3].d, yg[2].d, yg[1].d, yg[0].d);
                let a = acc4.get_unchecked_mut(j * groups + g);
                *a = _mm_fmadd_ps(dots, _mm_mul_ps(yd, _mm_set1_ps(p.d)), *a);
                *a = _mm_fnmadd_ps(offs, _mm_mul_ps(yd, _mm_set1_ps(p.dm)), *a);
            }
            for k in 0..rest {
                let yi = y(4 * groups + k);
                let [dots] = x.dots::<M, 1>(&p, [yi]);
                let a = acc1.get_unchecked_mut(j * 3 + k);
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(p.d * yi.d), *a);
                let offs = _mm256_cvtepi32_ps(offsets(&p, yi));
                *a = _mm256_fnmadd_ps(offs, _mm256_set1_ps(p.dm * yi.d), *a);
            }
        }
    }
    for j in 0..w.len() {
        let out = &mut out[j * m..(j + 1) * m];
        for g in 0..groups {
            _mm_storeu_ps(out[4 * g..].as_mut_ptr(), acc4[j * groups + g]);
        }
        for k in 0..rest {
            out[4 * groups + k] = hsum(acc1[j * 3 + k]);
        }
    }
}

/// `vpshufb` masks that repeat one i16 lane (of eight) across each 128-bit half.
static LANE_BROADCAST: [[u8; 32]; 8] = {
    let mut masks = [[0u8; 32]; 8];
    let mut lane = 0;
    while lane < 8 {
        let mut i = 0;
        while i < 32 {
            masks[lane][i] = (2 * lane + i % 2) as u8;
            i += 1;
        }
        lane += 1;
    }
    masks
};

/// Masks giving i16 lane 2p in the low half and lane 2p+1 in the high half: the scales of
/// the two 16-value Q6_K sub-blocks that 32 values span.
static PAIR_BROADCAST: [[u8; 32]; 4] = {
    let mut masks = [[0u8; 32]; 4];
    let mut p = 0;
    while p < 4 {
        let mut i = 0;
        while i < 32 {
            let lane = 2 * p + i / 16;
            masks[p][i] = (2 * lane + i % 2) as u8;
            i += 1;
        }
        p += 1;
    }
    masks
};

/// Q4_K/Q5_K: the 6-bit scales (both halves) and the minimums, doubled to weigh the
/// activation's 16-value sums. Sub-blocks 4..8 keep their low 4 bits in bytes 8..12 and
/// their top 2 bits in the spare top bits of bytes 0..8.
#[inline(always)]
unsafe fn prepare_k(packed: &[u8; 12], d: f32, dmin: f32) -> Prepared {
    let word = |i: usize| {
        u32::from_le_bytes([
            packed[4 * i],
            packed[4 * i + 1],
            packed[4 * i + 2],
            packed[4 * i + 3],
        ])
    };
    let (a, b, c) = (word(0), word(1), word(2));
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let scales_lo = a & LOW6;
    let mins_lo = b & LOW6;
    let scales_hi = (c & LOW4) | (((a >> 6) & LOW2) << 4);
    let mins_hi = ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4);
    let bytes = _mm_set_epi32(
        mins_hi as i32,
        mins_lo as i32,
        scales_hi as i32,
        scales_lo as i32,
    );
    let unpacked = _mm256_cvtepu8_epi16(bytes);
    let mins = _mm256_extracti128_si256(unpacked, 1);
    Prepared {
        scales: _mm256_permute2x128_si256(unpacked, unpacked, 0x00),
        offset_weights: _mm256_set_m128i(
            _mm_unpackhi_epi16(mins, mins),
            _mm_unpacklo_epi16(mins, mins),
        ),
        d,
        dm: dmin,
    }
}

/// Q4_K and Q5_K differ only in how chunk c's 64 values are unpacked into its low-nibble
/// and high-nibble halves (`unpack`).
#[inline(always)]
unsafe fn k_quant_dots<M: MulAdd, const R: usize>(
    p: &Prepared,
    ys: [&BlockQ8K; R],
    unpack: impl Fn(usize) -> (__m256i, __m256i),
) -> [__m256i; R] {
    // Two chains per row, so the multiply-adds do not wait on each other.
    let mut lo_sums = [_mm256_setzero_si256(); R];
    let mut hi_sums = [_mm256_setzero_si256(); R];
    for c in 0..4 {
        let (lo, hi) = unpack(c);
        let scale_lo = _mm256_shuffle_epi8(p.scales, load(LANE_BROADCAST[2 * c].as_ptr()));
        let scale_hi = _mm256_shuffle_epi8(p.scales, load(LANE_BROADCAST[2 * c + 1].as_ptr()));
        for r in 0..R {
            let y = ys[r].qs.as_ptr().add(64 * c);
            lo_sums[r] = M::mul_add(lo_sums[r], _mm256_maddubs_epi16(lo, load(y)), scale_lo);
            hi_sums[r] = M::mul_add(
                hi_sums[r],
                _mm256_maddubs_epi16(hi, load(y.add(32))),
                scale_hi,
            );
        }
    }
    let mut out = lo_sums;
    for r in 0..R {
        out[r] = _mm256_add_epi32(lo_sums[r], hi_sums[r]);
    }
    out
}

impl Avx2Block for BlockQ4K {
    #[inline(always)]
    unsafe fn prepare(&self) -> Prepared {
        prepare_k(&self.scales, f32_of(self.d), f32_of(self.dmin))
    }

    #[inline(always)]
    unsafe fn dots<M: MulAdd, const R: usize>(
        &self,
        p: &Prepared,
        ys: [&BlockQ8K; R],
    ) -> [__m256i; R] {
        let low4 = _mm256_set1_epi8(0x0F);
        // Byte j of chunk c: value 64c + j in the low nibble, 64c + 32 + j in the high.
        k_quant_dots::<M, R>(p, ys, |c| {
            let q = load(self.qs.as_ptr().add(32 * c));
            (
                _mm256_and_si256(q, low4),
                _mm256_and_si256(_mm256_srli_epi16(q, 4), low4),
            )
        })
    }
}

impl Avx2Block for BlockQ5K {
    #[inline(always)]
    unsafe fn prepare(&self) -> Prepared {
        prepare_k(&self.scales, f32_of(self.d), f32_of(self.dmin))
    }

    #[inline(always)]
    unsafe fn dots<M: MulAdd, const R: usize>(
        &self,
        p: &Prepared,
        ys: [&BlockQ8K; R],
    ) -> [__m256i; R] {
        let low4 = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        let qh = load(self.qh.as_ptr());
        // As Q4_K, with bits 2c and 2c+1 of qh[j] as the fifth bits.
        k_quant_dots::<M, R>(p, ys, |c| {
            let q = load(self.qs.as_ptr().add(32 * c));
            let qh = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c as i32));
            let fifth_lo = _mm256_slli_epi16(_mm256_and_si256(qh, one), 4);
            let fifth_hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4);
            (
                _mm256_or_si256(_mm256_and_si256(q, low4), fifth_lo),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), low4), fifth_hi),
            )
        })
    }
}

impl Avx2Block for BlockQ6K {
    #[inline(always)]
    unsafe fn prepare(&self) -> Prepared {
        let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(self.scales.as_ptr() as *const __m128i));
        let d = f32_of(self.d);
        // Values are stored +32: the offset term is 32·Σ scale·bsum, weighed by d.
        Prepared {
            scales,
            offset_weights: _mm256_slli_epi16(scales, 5),
            d,
            dm: d,
        }
    }

    #[inline(always)]
    unsafe fn dots<M: MulAdd, const R: usize>(
        &self,
        p: &Prepared,
        ys: [&BlockQ8K; R],
    ) -> [__m256i; R] {
        let low4 = _mm256_set1_epi8(0x0F);
        let bits01 = _mm256_set1_epi8(0x03);
        let bits45 = _mm256_set1_epi8(0x30);
        let mut sums = [[_mm256_setzero_si256(); R]; 2];
        for h in 0..2 {
            // Sub-blocks 8h..8h+8, as i16 in both halves, for the pair shuffles.
            let half_scales = if h == 0 {
                _mm256_permute2x128_si256(p.scales, p.scales, 0x00)
            } else {
                _mm256_permute2x128_si256(p.scales, p.scales, 0x11)
            };
            let ql0 = load(self.ql.as_ptr().add(64 * h));
            let ql1 = load(self.ql.as_ptr().add(64 * h + 32));
            let qh = load(self.qh.as_ptr().add(32 * h));
            // Four runs of 32 values, 0..64 unsigned.
            let runs = [
                _mm256_or_si256(
                    _mm256_and_si256(ql0, low4),
                    _mm256_slli_epi16(_mm256_and_si256(qh, bits01), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, low4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), bits01), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                    _mm256_and_si256(qh, bits45),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), bits45),
                ),
            ];
            for (run, &q) in runs.iter().enumerate() {
                let scale = _mm256_shuffle_epi8(half_scales, load(PAIR_BROADCAST[run].as_ptr()));
                for r in 0..R {
                    let y = ys[r].qs.as_ptr().add(128 * h + 32 * run);
                    let chain = &mut sums[run % 2][r];
                    *chain = M::mul_add(*chain, _mm256_maddubs_epi16(q, load(y)), scale);
                }
            }
        }
        let mut out = sums[0];
        for r in 0..R {
            out[r] = _mm256_add_epi32(sums[0][r], sums[1][r]);
        }
        out
    }
}
