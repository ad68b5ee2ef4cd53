//! The ggml K-quant block layouts, as they lie in a GGUF file, and the Q8_K blocks that
//! activations are quantized to before a product.
//!
//! Candle has the same structs, but their fields are private to it; these are `repr(C)` with
//! the identical layout so that a mapped file can be read as a slice of them.

use half::f16;

/// Values per super-block.
pub const QK_K: usize = 256;

/// 4.5 bits per weight: 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit minimum.
#[repr(C)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// 5.5 bits per weight: Q4_K plus one high bit per value in `qh`.
#[repr(C)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// 6.5625 bits per weight: 16 sub-blocks of 16 with signed 8-bit scales, values offset by 32.
#[repr(C)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// 3.4375 bits per weight: 16 sub-blocks of 16 with 6-bit scales (stored +32), values of two
/// bits in `qs` and a third in `hmask`, offset by 4.
#[repr(C)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; 12],
    pub d: f16,
}

/// 2.625 bits per weight: 16 sub-blocks of 16 with a 4-bit scale (low nibble) and a 4-bit
/// minimum (high nibble) each, values of two bits.
#[repr(C)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: f16,
    pub dmin: f16,
}

/// An activation super-block: 8-bit values, their scale, and sums of each 16 values (which
/// carry the weights' minimums and offsets without touching the values again).
#[repr(C)]
#[derive(Clone)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

/// A weight block type that our kernels multiply.
pub trait WeightBlock: Sized {
    const BYTES: usize = std::mem::size_of::<Self>();
}
impl WeightBlock for BlockQ4K {}
impl WeightBlock for BlockQ5K {}
impl WeightBlock for BlockQ6K {}
impl WeightBlock for BlockQ3K {}
impl WeightBlock for BlockQ2K {}

/// Views `bytes` as blocks, or `None` when the length or the alignment does not fit.
pub fn as_blocks<T: WeightBlock>(bytes: &[u8]) -> Option<&[T]> {
    // SAFETY: the block types are plain integers and f16s, valid for any bit pattern;
    // `align_to` only hands out a correctly aligned middle part, and we demand it be all.
    let (head, blocks, tail) = unsafe { bytes.align_to::<T>() };
    (head.is_empty() && tail.is_empty()).then_some(blocks)
}

/// The 6-bit scales and minimums of the 8 sub-blocks of a Q4_K or Q5_K block.
#[inline(always)]
pub fn scales_and_mins(packed: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let [scales_lo, scales_hi, mins_lo, mins_hi] = scale_words(packed).map(u32::to_le_bytes);
    let join = |lo: [u8; 4], hi: [u8; 4]| [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
    (join(scales_lo, scales_hi), join(mins_lo, mins_hi))
}

/// The scales of sub-blocks 0..4 and 4..8, then the minimums', four bytes to a word.
/// Sub-blocks 4..8 keep their low 4 bits in bytes 8..12 and their top 2 bits in the spare
/// top bits of the first eight bytes. Word-wide, not byte by byte: a byte loop is what the
/// compiler would vectorize into 512-bit instructions inside the AVX-512 kernels, whose
/// mere presence slows the 256-bit work around them on Intel cores.
#[inline(always)]
pub fn scale_words(packed: &[u8; 12]) -> [u32; 4] {
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
    [
        a & LOW6,
        (c & LOW4) | (((a >> 6) & LOW2) << 4),
        b & LOW6,
        ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4),
    ]
}

impl BlockQ3K {
    /// The 16 sub-blocks' scales, signed (−32..=31). Sub-block s keeps its low 4 bits in the
    /// low (s < 8) or high nibble of byte s % 8, its top 2 bits at bit 2(s / 4) of byte
    /// 8 + s % 4. Word-wide, for the reason `scale_words` gives.
    #[inline(always)]
    pub fn signed_scales(&self) -> [i8; 16] {
        let p = &self.scales;
        let word =
            |i: usize| u32::from_le_bytes([p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]]);
        let (a, b, c) = (word(0), word(1), word(2));
        const LOW4: u32 = 0x0f0f_0f0f;
        const LOW2: u32 = 0x0303_0303;
        let words = [
            (a & LOW4) | ((c & LOW2) << 4),
            (b & LOW4) | (((c >> 2) & LOW2) << 4),
            ((a >> 4) & LOW4) | (((c >> 4) & LOW2) << 4),
            ((b >> 4) & LOW4) | (((c >> 6) & LOW2) << 4),
        ];
        // Each byte (0..=63) less 32, four at a time: with its top bit set first, no byte
        // borrows from the next.
        let signed = words.map(|w| (w | 0x8080_8080).wrapping_sub(0x2020_2020) ^ 0x8080_8080);
        let all = signed
            .iter()
            .rev()
            .fold(0u128, |all, &w| (all << 32) | u128::from(w));
        all.to_le_bytes().map(|b| b as i8)
    }
}

impl BlockQ2K {
    /// The 16 sub-blocks' scales and minimums (0..=15 each), all 16 bytes at once.
    #[inline(always)]
    pub fn scales_and_mins(&self) -> ([i8; 16], [i8; 16]) {
        const LOW4: u128 = 0x0f0f_0f0f_0f0f_0f0f_0f0f_0f0f_0f0f_0f0f;
        let packed = u128::from_le_bytes(self.scales);
        let bytes = |v: u128| v.to_le_bytes().map(|b| b as i8);
        (bytes(packed & LOW4), bytes((packed >> 4) & LOW4))
    }
}

/// Quantizes `xs` (a multiple of 256 long) to Q8_K the way Candle does (scale from the
/// value of largest magnitude, rounded half away from zero), so that products agree with
/// Candle's kernels up to the order of float additions.
pub fn quantize_q8k(xs: &[f32], out: &mut [BlockQ8K]) {
    debug_assert_eq!(xs.len(), out.len() * QK_K);
    for (x, block) in xs.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut max = 0f32;
        let mut amax = 0f32;
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            block.d = 0.0;
            block.qs.fill(0);
            block.bsums.fill(0);
            continue;
        }
        let iscale = -127f32 / max;
        for (q, &v) in block.qs.iter_mut().zip(x) {
            *q = (iscale * v).round().clamp(-128.0, 127.0) as i8;
        }
        for (sum, qs) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *sum = qs.iter().map(|&q| i16::from(q)).sum();
        }
        block.d = 1.0 / iscale;
    }
}

impl BlockQ8K {
    pub const ZERO: Self = Self {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
}

/// Activation rows' Q8_K blocks of one block column, interleaved for `vpdpbusd`: each
/// 32-byte vector `qs[k]` holds values RUN·k..RUN·(k+1) of row 0, then of row 1, ..., so one
/// instruction multiplies RUN broadcast weights with the same positions of every row. RUN 4
/// groups eight rows (one i32 lane each); RUN 8 four (a pair of lanes each, summed at the
/// end), for four to seven decoding streams, which eight would leave half idle.
#[repr(C, align(32))]
#[derive(Clone)]
pub struct BlockQ8Kx<const RUN: usize> {
    /// The first `QK_K / RUN` vectors hold the values.
    pub qs: [[i8; 32]; QK_K / 4],
    /// Per lane, its row's scale.
    pub d: [f32; 8],
    /// `sums[q]`: in each row's first lane, the sums of its 32-value sub-blocks 2q and 2q+1
    /// as an i16 pair (what the weights' minimums multiply); zero in the others.
    pub sums: [[i16; 16]; 4],
    /// `bsums[q]`: the same for the 16-value sums 2q and 2q+1 (Q6_K's sub-blocks).
    pub bsums: [[i16; 16]; 8],
}

/// Eight rows, four values of each per vector.
pub type BlockQ8Kx8 = BlockQ8Kx<4>;
/// Four rows, eight values of each per vector.
pub type BlockQ8Kx4 = BlockQ8Kx<8>;

impl<const RUN: usize> BlockQ8Kx<RUN> {
    /// Activation rows in a group.
    pub const ROWS: usize = 32 / RUN;
    /// i32 lanes per row.
    pub const LANES: usize = RUN / 4;

    /// Block column `b` of up to `ROWS` activation rows; the rest of the group is zeros.
    pub fn interleave(rows: &[&[BlockQ8K]], b: usize) -> Self {
        assert!(rows.len() <= Self::ROWS, "at most {} rows", Self::ROWS);
        let mut out = Self {
            qs: [[0; 32]; QK_K / 4],
            d: [0.0; 8],
            sums: [[0; 16]; 4],
            bsums: [[0; 16]; 8],
        };
        for (r, row) in rows.iter().enumerate() {
            let y = &row[b];
            let lane = r * Self::LANES;
            out.d[lane..lane + Self::LANES].fill(y.d);
            for (k, group) in out.qs[..QK_K / RUN].iter_mut().enumerate() {
                group[RUN * r..RUN * (r + 1)].copy_from_slice(&y.qs[RUN * k..RUN * (k + 1)]);
            }
            lane_sums(y, lane, &mut out.sums, &mut out.bsums);
        }
        out
    }
}

/// An interleaved group's sums of one row, into i32 lane `lane` as i16 pairs: `sums[q]`
/// holds its 32-value sub-blocks 2q and 2q+1, `bsums[q]` its 16-value ones.
fn lane_sums<const N: usize>(
    y: &BlockQ8K,
    lane: usize,
    sums: &mut [[i16; N]; 4],
    bsums: &mut [[i16; N]; 8],
) {
    for (q, sums) in sums.iter_mut().enumerate() {
        for half in 0..2 {
            let s = 2 * q + half;
            sums[2 * lane + half] = y.bsums[2 * s] + y.bsums[2 * s + 1];
        }
    }
    for (q, bsums) in bsums.iter_mut().enumerate() {
        bsums[2 * lane] = y.bsums[2 * q];
        bsums[2 * lane + 1] = y.bsums[2 * q + 1];
    }
}

/// Sixteen activation rows' Q8_K blocks of one block column for AVX-512's 512-bit
/// `vpdpbusd`: each 64-byte vector `qs[k]` holds values 4k..4k+4 of row 0, then of rows 1 to
/// 15 (zeros past the real rows), so that one instruction multiplies four broadcast weights
/// with the same positions of sixteen rows, one i32 lane each: twice the rows of
/// `BlockQ8Kx8` per instruction.
#[repr(C, align(64))]
#[derive(Clone)]
pub struct BlockQ8Kx16 {
    pub qs: [[i8; 64]; QK_K / 4],
    /// Lane r: row r's scale.
    pub d: [f32; 16],
    /// `sums[q]`: in lane r, the sums of row r's 32-value sub-blocks 2q and 2q+1 as an i16
    /// pair (what the weights' minimums multiply).
    pub sums: [[i16; 32]; 4],
    /// `bsums[q]`: the same for the 16-value sums 2q and 2q+1 (Q6_K's sub-blocks).
    pub bsums: [[i16; 32]; 8],
}

impl BlockQ8Kx16 {
    /// Activation rows in a group.
    pub const ROWS: usize = 16;

    /// Block column `b` of up to sixteen activation rows; the rest of the group is zeros.
    pub fn interleave(rows: &[&[BlockQ8K]], b: usize) -> Self {
        assert!(rows.len() <= Self::ROWS, "at most {} rows", Self::ROWS);
        let mut out = Self {
            qs: [[0; 64]; QK_K / 4],
            d: [0.0; 16],
            sums: [[0; 32]; 4],
            bsums: [[0; 32]; 8],
        };
        for (r, row) in rows.iter().enumerate() {
            let y = &row[b];
            out.d[r] = y.d;
            for (k, group) in out.qs.iter_mut().enumerate() {
                group[4 * r..4 * (r + 1)].copy_from_slice(&y.qs[4 * k..4 * (k + 1)]);
            }
            lane_sums(y, r, &mut out.sums, &mut out.bsums);
        }
        out
    }
}
