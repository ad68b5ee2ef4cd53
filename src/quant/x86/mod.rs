//! x86 products of K-quant weight rows with Q8_K activation rows, in builds chosen at run
//! time: AVX2 here, and AVX2 with VNNI in `vnni.rs`.
//!
//! The weights are read in the file's own block layout (no repacked copy). A tile of weight
//! rows meets a tile of activation rows one 256-value block column at a time, so that
//! column's activations stay in L1 for all the tile's weight rows.
//!
//! AVX2: each 32 values of a row take one `maddubs` (unsigned weight × signed activation,
//! pairs summed to i16) and one `madd` by the sub-block scale (to i32); four activation
//! rows share each unpacking of a weight block, and their sums are reduced together.

use std::arch::x86_64::*;

use super::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};
use super::{TILE_ACTS, TILE_ROWS};

mod vnni;
pub use vnni::{has_avx512_vnni, has_avx_vnni, tile_avx512_vnni, tile_avx_vnni, VnniBlock};

pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// `out[j * ys.len() + i] = w[j] · ys[i]`, with AVX2.
///
/// Safety: the CPU must have AVX2, FMA and F16C (`has_avx2`); every row of `w` and `ys` has
/// the same number of blocks; at most `TILE_ROWS` × `TILE_ACTS`; `out` is `w.len() * ys.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_avx2<B: Avx2Block>(w: &[&[B]], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    tile::<Avx2, B>(w, ys, out)
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
    unsafe fn dots<A: MulAdd, const R: usize>(
        &self,
        p: &Prepared,
        ys: [&BlockQ8K; R],
    ) -> [__m256i; R];
}

/// `acc + Σ a·b` over each i32 lane's two i16 pairs: where each 32 values' products take
/// their scale. AVX2 takes two instructions (`madd`, `add`); VNNI's `vpdpwssd` one, which
/// takes a third off the work per activation row (`vnni.rs`). The sums are exact either way.
pub trait MulAdd {
    unsafe fn mul_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i;
}

/// AVX2's `madd` and `add`.
pub struct Avx2;

impl MulAdd for Avx2 {
    #[inline(always)]
    unsafe fn mul_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
    }
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
unsafe fn tile<A: MulAdd, B: Avx2Block>(w: &[&[B]], ys: &[&[BlockQ8K]], out: &mut [f32]) {
    let m = ys.len();
    let groups = m / 4;
    let rest = m - 4 * groups;
    // One accumulator per weight row and group of four activation rows (its four outputs),
    // and eight partial sums per weight row and leftover activation row.
    let mut acc4 = [_mm_setzero_ps(); TILE_ROWS * TILE_ACTS / 4];
    let mut acc1 = [_mm256_setzero_ps(); TILE_ROWS * 3];
    let blocks = w.first().map_or(0, |row| row.len());
    // What the unchecked indexing below relies on.
    debug_assert!(w.len() <= TILE_ROWS && m <= TILE_ACTS && rest < 4);
    debug_assert!(w.iter().all(|row| row.len() == blocks));
    debug_assert!(ys.iter().all(|y| y.len() >= blocks));
    debug_assert!(out.len() >= w.len() * m);
    if m <= ROW_ORDER_ACTS {
        // Decoding, one stream or a few: one weight row after another, each a single
        // stream from memory, prefetched (block columns across rows would be eight streams
        // at once); the few activation rows stay in L1 anyway.
        for (j, row) in w.iter().enumerate() {
            for (b, x) in row.iter().enumerate() {
                prefetch(x);
                block_products::<A, B>(x, ys, b, &mut acc4[j * groups..], &mut acc1[j * 3..]);
            }
        }
    } else {
        // A block column's activations stay in L1 for all the tile's weight rows.
        for b in 0..blocks {
            for (j, row) in w.iter().enumerate() {
                let x = row.get_unchecked(b);
                block_products::<A, B>(x, ys, b, &mut acc4[j * groups..], &mut acc1[j * 3..]);
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

/// Weight block `x` (block column `b`) with every activation row: into `acc4` (one per
/// group of four rows) and `acc1` (one per leftover row). A function, not a closure: a
/// closure would not inherit the caller's target features, and its intrinsics would be
/// calls.
#[inline(always)]
unsafe fn block_products<A: MulAdd, B: Avx2Block>(
    x: &B,
    ys: &[&[BlockQ8K]],
    b: usize,
    acc4: &mut [__m128],
    acc1: &mut [__m256],
) {
    let groups = ys.len() / 4;
    let rest = ys.len() - 4 * groups;
    let p = x.prepare();
    let y = |i: usize| ys.get_unchecked(i).get_unchecked(b);
    for g in 0..groups {
        let yg = [y(4 * g), y(4 * g + 1), y(4 * g + 2), y(4 * g + 3)];
        let dots = hsum4(x.dots::<A, 4>(&p, yg));
        let offs = hsum4([
            offsets(&p, yg[0]),
            offsets(&p, yg[1]),
            offsets(&p, yg[2]),
            offsets(&p, yg[3]),
        ]);
        let yd = _mm_set_ps(yg[3].d, yg[2].d, yg[1].d, yg[0].d);
        let a = acc4.get_unchecked_mut(g);
        *a = _mm_fmadd_ps(dots, _mm_mul_ps(yd, _mm_set1_ps(p.d)), *a);
        *a = _mm_fnmadd_ps(offs, _mm_mul_ps(yd, _mm_set1_ps(p.dm)), *a);
    }
    leftover_rows::<A, B>(x, &p, y, 4 * groups, rest, acc1.as_mut_ptr());
}

/// Activation rows up to which a tile goes row by row (decoding streams): 8 rows of an
/// 8192-column matrix are 74 KiB of Q8_K blocks, which L2 holds beside the weights.
const ROW_ORDER_ACTS: usize = 8;

/// How far ahead of the weight block in use the decode path asks for the next ones. The
/// hardware prefetchers stop at 4 KiB page boundaries; asking a page ahead keeps a stream
/// of rows flowing. Measured on a 2-core Xeon (260 MiB L3, 15.7 GB/s), Phi-3-mini-shaped
/// Q4_K_M, one stream: 3.3-3.8 tokens/s without, 5.2-5.5 with 2-16 KiB (4 KiB best).
const PREFETCH_AHEAD: usize = 4096;

/// Asks for the cache lines `PREFETCH_AHEAD` bytes past `block` (a hint: an address past
/// the mapping does not fault, and nothing is read through the pointer).
#[inline(always)]
unsafe fn prefetch<B>(block: &B) {
    let at = (block as *const B as *const i8).wrapping_add(PREFETCH_AHEAD);
    for line in 0..std::mem::size_of::<B>().div_ceil(64) {
        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * line));
    }
}

/// `acc[k] += x · y(first + k)` as eight partial sums each, for the `rest` (0..4) activation
/// rows beyond the groups of four: one unpacking of `x` serves all of them.
#[inline(always)]
unsafe fn leftover_rows<'y, A: MulAdd, B: Avx2Block>(
    x: &B,
    p: &Prepared,
    y: impl Fn(usize) -> &'y BlockQ8K,
    first: usize,
    rest: usize,
    acc: *mut __m256,
) {
    match rest {
        1 => rows_of::<A, B, 1>(x, p, [y(first)], acc),
        2 => rows_of::<A, B, 2>(x, p, [y(first), y(first + 1)], acc),
        3 => rows_of::<A, B, 3>(x, p, [y(first), y(first + 1), y(first + 2)], acc),
        _ => {}
    }
}

#[inline(always)]
unsafe fn rows_of<A: MulAdd, B: Avx2Block, const R: usize>(
    x: &B,
    p: &Prepared,
    ys: [&BlockQ8K; R],
    acc: *mut __m256,
) {
    let dots = x.dots::<A, R>(p, ys);
    for (k, y) in ys.into_iter().enumerate() {
        let acc = &mut *acc.add(k);
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[k]), _mm256_set1_ps(p.d * y.d), *acc);
        let offs = _mm256_cvtepi32_ps(offsets(p, y));
        *acc = _mm256_fnmadd_ps(offs, _mm256_set1_ps(p.dm * y.d), *acc);
    }
}

/// A block's unpacked weights, one sub-block of 32 per row.
#[repr(C, align(32))]
struct Unpacked([[u8; 32]; 8]);

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
unsafe fn k_quant_dots<A: MulAdd, const R: usize>(
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
            lo_sums[r] = A::mul_add(lo_sums[r], _mm256_maddubs_epi16(lo, load(y)), scale_lo);
            hi_sums[r] = A::mul_add(
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
    unsafe fn dots<A: MulAdd, const R: usize>(
        &self,
        p: &Prepared,
        ys: [&BlockQ8K; R],
    ) -> [__m256i; R] {
        k_quant_dots::<A, R>(p, ys, |c| self.chunk(c))
    }
}

impl BlockQ4K {
    /// Chunk c's 64 values as u8: byte j holds value 64c + j in its low nibble and
    /// 64c + 32 + j in its high one.
    #[inline(always)]
    unsafe fn chunk(&self, c: usize) -> (__m256i, __m256i) {
        let low4 = _mm256_set1_epi8(0x0F);
        let q = load(self.qs.as_ptr().add(32 * c));
        (
            _mm256_and_si256(q, low4),
            _mm256_and_si256(_mm256_srli_epi16(q, 4), low4),
        )
    }
}

impl Avx2Block for BlockQ5K {
    #[inline(always)]
    unsafe fn prepare(&self) -> Prepared {
        prepare_k(&self.scales, f32_of(self.d), f32_of(self.dmin))
    }

    #[inline(always)]
    unsafe fn dots<A: MulAdd, const R: usize>(
        &self,
        p: &Prepared,
        ys: [&BlockQ8K; R],
    ) -> [__m256i; R] {
        k_quant_dots::<A, R>(p, ys, |c| self.chunk(c))
    }
}

impl BlockQ5K {
    /// As Q4_K's chunks, with bits 2c and 2c+1 of qh[j] as the fifth bits.
    #[inline(always)]
    unsafe fn chunk(&self, c: usize) -> (__m256i, __m256i) {
        let low4 = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        let q = load(self.qs.as_ptr().add(32 * c));
        let qh = _mm256_srl_epi16(load(self.qh.as_ptr()), _mm_cvtsi32_si128(2 * c as i32));
        let fifth_lo = _mm256_slli_epi16(_mm256_and_si256(qh, one), 4);
        let fifth_hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4);
        (
            _mm256_or_si256(_mm256_and_si256(q, low4), fifth_lo),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), low4), fifth_hi),
        )
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
    unsafe fn dots<A: MulAdd, const R: usize>(
        &self,
        p: &Prepared,
        ys: [&BlockQ8K; R],
    ) -> [__m256i; R] {
        let mut sums = [[_mm256_setzero_si256(); R]; 2];
        for h in 0..2 {
            // Sub-blocks 8h..8h+8, as i16 in both halves, for the pair shuffles.
            let half_scales = if h == 0 {
                _mm256_permute2x128_si256(p.scales, p.scales, 0x00)
            } else {
                _mm256_permute2x128_si256(p.scales, p.scales, 0x11)
            };
            for (run, q) in self.runs(h).into_iter().enumerate() {
                let scale = _mm256_shuffle_epi8(half_scales, load(PAIR_BROADCAST[run].as_ptr()));
                for r in 0..R {
                    let y = ys[r].qs.as_ptr().add(128 * h + 32 * run);
                    let chain = &mut sums[run % 2][r];
                    *chain = A::mul_add(*chain, _mm256_maddubs_epi16(q, load(y)), scale);
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

impl BlockQ6K {
    /// Half h's four runs of 32 values (values 128h + 32·run + l), 0..64 unsigned: ql's low
    /// nibbles, the next 32 bytes' low nibbles, then the high nibbles, each with two bits of
    /// qh on top.
    #[inline(always)]
    unsafe fn runs(&self, h: usize) -> [__m256i; 4] {
        let low4 = _mm256_set1_epi8(0x0F);
        let bits01 = _mm256_set1_epi8(0x03);
        let bits45 = _mm256_set1_epi8(0x30);
        let ql0 = load(self.ql.as_ptr().add(64 * h));
        let ql1 = load(self.ql.as_ptr().add(64 * h + 32));
        let qh = load(self.qh.as_ptr().add(32 * h));
        [
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
        ]
    }
}

/// `blocks::quantize_q8k` with AVX2, with identical results: the same scale, and rounding
/// half away from zero done exactly (truncate, then step out where the remainder is ≥ ½).
///
/// Safety: the CPU must have AVX2 and FMA (`has_avx2`); `xs.len() == out.len() * 256`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8k(xs: &[f32], out: &mut [BlockQ8K]) {
    let sign_bit = _mm256_set1_ps(-0.0);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    // packs interleave 128-bit lanes; this puts the 32 bytes back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (x, block) in xs.chunks_exact(super::QK_K).zip(out.iter_mut()) {
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
                let t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                let rest = _mm256_andnot_ps(sign_bit, _mm256_sub_ps(v, t));
                let step = _mm256_and_ps(_mm256_cmp_ps(rest, half, _CMP_GE_OQ), one);
                let r = _mm256_add_ps(t, _mm256_or_ps(step, _mm256_and_ps(v, sign_bit)));
                *int = _mm256_cvttps_epi32(r);
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
