//! Portable dot products of K-quant weight rows with Q8_K activation rows: the reference
//! the SIMD kernels are tested against, and the path on CPUs without them.

use super::blocks::QK_K;
use super::blocks::{scales_and_mins, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};

/// A K-quant block's product with a Q8_K block.
pub trait ScalarBlock {
    fn dot(&self, y: &BlockQ8K) -> f32;
}

/// One weight row · one activation row.
pub fn dot<B: ScalarBlock>(w: &[B], y: &[BlockQ8K]) -> f32 {
    w.iter().zip(y).map(|(x, y)| x.dot(y)).sum()
}

impl ScalarBlock for BlockQ4K {
    fn dot(&self, y: &BlockQ8K) -> f32 {
        q4k_block(self, y)
    }
}

impl ScalarBlock for BlockQ5K {
    fn dot(&self, y: &BlockQ8K) -> f32 {
        q5k_block(self, y)
    }
}

impl ScalarBlock for BlockQ6K {
    fn dot(&self, y: &BlockQ8K) -> f32 {
        q6k_block(self, y)
    }
}

impl ScalarBlock for BlockQ3K {
    fn dot(&self, y: &BlockQ8K) -> f32 {
        q3k_block(self, y)
    }
}

impl ScalarBlock for BlockQ2K {
    fn dot(&self, y: &BlockQ8K) -> f32 {
        q2k_block(self, y)
    }
}

/// Σ q·y per sub-block weighted by its scale, and Σ min·(sum of y) per sub-block, for the
/// 4- and 5-bit types whose values are `d·scale·q − dmin·min`.
fn k_block(values: impl Fn(usize) -> i32, packed_scales: &[u8; 12], y: &BlockQ8K) -> (i32, i32) {
    let (scales, mins) = scales_and_mins(packed_scales);
    let mut scaled = 0i32;
    for (sub, &scale) in scales.iter().enumerate() {
        let dot: i32 = (sub * 32..sub * 32 + 32)
            .map(|i| values(i) * i32::from(y.qs[i]))
            .sum();
        scaled += dot * i32::from(scale);
    }
    let offsets = mins
        .iter()
        .enumerate()
        .map(|(sub, &m)| {
            i32::from(m) * (i32::from(y.bsums[2 * sub]) + i32::from(y.bsums[2 * sub + 1]))
        })
        .sum();
    (scaled, offsets)
}

fn q4k_block(x: &BlockQ4K, y: &BlockQ8K) -> f32 {
    // Byte j of chunk c holds value 64c + j in its low nibble and 64c + 32 + j in its high.
    let value = |i: usize| {
        let byte = x.qs[i / 64 * 32 + i % 32];
        i32::from(if i % 64 < 32 { byte & 0x0F } else { byte >> 4 })
    };
    let (scaled, offsets) = k_block(value, &x.scales, y);
    y.d * (x.d.to_f32() * scaled as f32 - x.dmin.to_f32() * offsets as f32)
}

fn q5k_block(x: &BlockQ5K, y: &BlockQ8K) -> f32 {
    // As Q4_K, plus bit (2c or 2c+1) of qh[j] as the fifth bit.
    let value = |i: usize| {
        let (chunk, high, j) = (i / 64, i % 64 >= 32, i % 32);
        let byte = x.qs[chunk * 32 + j];
        let low = if high { byte >> 4 } else { byte & 0x0F };
        let bit = (x.qh[j] >> (2 * chunk + usize::from(high))) & 1;
        i32::from(low | (bit << 4))
    };
    let (scaled, offsets) = k_block(value, &x.scales, y);
    y.d * (x.d.to_f32() * scaled as f32 - x.dmin.to_f32() * offsets as f32)
}

fn q6k_block(x: &BlockQ6K, y: &BlockQ8K) -> f32 {
    let mut sum = 0i32;
    for i in 0..QK_K {
        // Halves of 128 values; within one, four runs of 32 take ql's low nibbles, the next
        // 32 bytes' low nibbles, then the high nibbles, with two bits each from qh.
        let (half, run, l) = (i / 128, i % 128 / 32, i % 32);
        let ql = x.ql[half * 64 + (run % 2) * 32 + l];
        let low = if run < 2 { ql & 0x0F } else { ql >> 4 };
        let high = (x.qh[half * 32 + l] >> (2 * run)) & 3;
        let q = i32::from(low | (high << 4)) - 32;
        sum += q * i32::from(y.qs[i]) * i32::from(x.scales[i / 16]);
    }
    y.d * x.d.to_f32() * sum as f32
}

fn q3k_block(x: &BlockQ3K, y: &BlockQ8K) -> f32 {
    let scales = x.signed_scales();
    let mut sum = 0i32;
    for i in 0..QK_K {
        // Halves of 128 values; within one, run r of 32 takes bits 2r..2r+2 of qs[32h + l]
        // and, as its third bit, bit 4h + r of hmask[l]; a value is those three bits − 4.
        let (half, run, l) = (i / 128, i % 128 / 32, i % 32);
        let low = (x.qs[half * 32 + l] >> (2 * run)) & 3;
        let high = (x.hmask[l] >> (4 * half + run)) & 1;
        let q = i32::from(low | (high << 2)) - 4;
        sum += q * i32::from(y.qs[i]) * i32::from(scales[i / 16]);
    }
    y.d * x.d.to_f32() * sum as f32
}

fn q2k_block(x: &BlockQ2K, y: &BlockQ8K) -> f32 {
    let (scales, mins) = x.scales_and_mins();
    let (mut scaled, mut offsets) = (0i32, 0i32);
    for i in 0..QK_K {
        // As Q3_K's low two bits: run r of half h is bits 2r..2r+2 of qs[32h + l].
        let (half, run, l) = (i / 128, i % 128 / 32, i % 32);
        let q = i32::from((x.qs[half * 32 + l] >> (2 * run)) & 3);
        scaled += q * i32::from(y.qs[i]) * i32::from(scales[i / 16]);
    }
    for (s, &m) in mins.iter().enumerate() {
        offsets += i32::from(m) * i32::from(y.bsums[s]);
    }
    y.d * (x.d.to_f32() * scaled as f32 - x.dmin.to_f32() * offsets as f32)
}
