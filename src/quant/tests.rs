//! Our kernels against Candle's on the same blocks and activations.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::blocks::QK_K;
use super::{Kernels, QMatrix, RawTensor, WeightBytes};

pub(super) use crate::testing::noise;

/// Blocks of random bits (every scale and value pattern), with small finite f16 factors.
pub(super) fn random_blocks(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> RawTensor {
    let block_bytes = dtype.type_size();
    let n_blocks = rows * cols / QK_K;
    let bits = noise(seed, n_blocks * block_bytes);
    let mut bytes: Vec<u8> = bits.iter().map(|v| ((v + 1.0) * 128.0) as u8).collect();
    let factors = noise(seed + 1, n_blocks * 2);
    for (b, block) in bytes.chunks_exact_mut(block_bytes).enumerate() {
        set_factors(
            dtype,
            block,
            factors[2 * b] * 0.01,
            factors[2 * b + 1] * 0.01,
        );
    }
    RawTensor::new(dtype, vec![rows, cols], WeightBytes::copied(&bytes)).unwrap()
}

/// A K-quant block's f16 factors `d` and `dmin`, where its type keeps them: they lead the
/// Q4_K and Q5_K blocks; Q6_K and Q3_K end with d, Q2_K with d, dmin.
fn set_factors(dtype: GgmlDType, block: &mut [u8], d: f32, dmin: f32) {
    let (d, dmin) = (
        half::f16::from_f32(d).to_le_bytes(),
        half::f16::from_f32(dmin).to_le_bytes(),
    );
    let n = block.len();
    match dtype {
        GgmlDType::Q6K | GgmlDType::Q3K => block[n - 2..].copy_from_slice(&d),
        GgmlDType::Q2K => {
            block[n - 4..n - 2].copy_from_slice(&d);
            block[n - 2..].copy_from_slice(&dmin);
        }
        _ => {
            block[..2].copy_from_slice(&d);
            block[2..4].copy_from_slice(&dmin);
        }
    }
}

fn candle_product(weights: &RawTensor, x: &Tensor) -> Vec<f32> {
    let matmul = QMatMul::from_qtensor(weights.to_qtensor().unwrap()).unwrap();
    matmul
        .forward(x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn ours(weights: &RawTensor, kernels: Kernels, x: &[f32], m: usize) -> Vec<f32> {
    QMatrix::new(weights, kernels)
        .expect("a K-quant matrix")
        .matmul(x, m)
}

fn assert_close(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(scale > 0.0, "{what}: all-zero products prove nothing");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * scale,
            "{what}: element {i}: ours {a}, theirs {b} (scale {scale})"
        );
    }
}

/// The K-quant types our kernels take.
const K_QUANTS: [GgmlDType; 5] = [
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q3K,
    GgmlDType::Q2K,
];

/// Every kernel of ours this CPU runs.
pub(super) fn kernels_to_test() -> Vec<Kernels> {
    let mut kernels = Kernels::available();
    kernels.retain(|k| *k != Kernels::Candle);
    kernels
}

#[test]
fn k_quant_products_match_candle() {
    let (rows, cols) = (44, 3 * QK_K);
    for (t, dtype) in K_QUANTS.into_iter().enumerate() {
        // Both random bit patterns and blocks Candle quantized from smooth values.
        let random = random_blocks(dtype, rows, cols, 7 + t as u64);
        let dense = Tensor::from_vec(
            noise(99 + t as u64, rows * cols),
            (rows, cols),
            &Device::Cpu,
        )
        .unwrap();
        let quantized =
            RawTensor::from_qtensor(&QTensor::quantize(&dense, dtype).unwrap()).unwrap();
        for (source, weights) in [("random bits", &random), ("quantized", &quantized)] {
            // The decode case, groups of 4 and of 8 (VNNI) with every remainder, one to eight
            // groups per unpacking; from 32 rows, groups of 16 (AVX-512 VNNI) beside a group
            // of four, the AVX2 rows or a padded group; also in a second and third tile of
            // activations (64 rows), and more than one tile of weights (44 rows: five tiles
            // and a part).
            for m in [
                1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 15, 16, 20, 33, 34, 35, 37, 42, 44, 63, 64, 65,
                71, 100, 140,
            ] {
                let x = noise(1000 + m as u64, m * cols);
                let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
                let theirs = candle_product(weights, &xt);
                for kernels in kernels_to_test() {
                    let what = format!("{dtype:?} {source} m={m} {kernels:?}");
                    assert_close(&ours(weights, kernels, &x, m), &theirs, &what);
                }
            }
        }
    }
}

/// Every stored value at its largest (all bits set), times activations that quantize to
/// ±127 throughout (Q8_K's largest magnitude): the largest sums a lane meets, which AVX2's
/// 16-bit chains must hold exactly (a chain one step too long wraps, and the product is far
/// off Candle's).
#[test]
fn the_largest_values_sum_exactly() {
    let (rows, cols) = (16, 2 * QK_K);
    for (t, dtype) in K_QUANTS.into_iter().enumerate() {
        let mut bytes = random_blocks(dtype, rows, cols, 40 + t as u64)
            .bytes()
            .as_bytes()
            .to_vec();
        for block in bytes.chunks_exact_mut(dtype.type_size()) {
            block.fill(0xFF);
            set_factors(dtype, block, 0.01, 0.01);
        }
        let weights = RawTensor::new(dtype, vec![rows, cols], WeightBytes::copied(&bytes)).unwrap();
        for m in [1, 4, 8, 16, 64] {
            // Constant rows quantize to ±127 throughout.
            for value in [1.0f32, -1.0] {
                let x = vec![value; m * cols];
                let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
                let theirs = candle_product(&weights, &xt);
                for kernels in kernels_to_test() {
                    let what = format!("{dtype:?} m={m} x={value} {kernels:?}");
                    assert_close(&ours(&weights, kernels, &x, m), &theirs, &what);
                }
            }
        }
    }
}

#[test]
fn zero_activations_give_zero() {
    let weights = random_blocks(GgmlDType::Q4K, 16, QK_K, 3);
    for kernels in kernels_to_test() {
        let out = ours(&weights, kernels, &vec![0.0; 2 * QK_K], 2);
        assert!(out.iter().all(|&v| v == 0.0), "{kernels:?}: {out:?}");
    }
}

#[test]
fn other_types_and_shapes_are_left_to_candle() {
    let q8 = RawTensor::new(
        GgmlDType::Q8_0,
        vec![4, 64],
        WeightBytes::copied(&vec![0u8; 4 * 2 * 34]),
    )
    .unwrap();
    assert!(QMatrix::new(&q8, Kernels::Scalar).is_none());
    let q4k = random_blocks(GgmlDType::Q4K, 4, QK_K, 5);
    assert!(QMatrix::new(&q4k, Kernels::Candle).is_none());
}

#[test]
fn raw_tensors_hold_exactly_their_shape() {
    let bytes = WeightBytes::copied(&vec![0u8; 4 * 144]);
    assert!(RawTensor::new(GgmlDType::Q4K, vec![4, QK_K], bytes.clone()).is_ok());
    // One row short, one too many, rows that are not whole blocks, a wrapping shape.
    for dims in [
        vec![5, QK_K],
        vec![3, QK_K],
        vec![8, 128],
        vec![1 << 62, 1 << 62, QK_K],
    ] {
        assert!(
            RawTensor::new(GgmlDType::Q4K, dims.clone(), bytes.clone()).is_err(),
            "{dims:?}"
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn kernels_the_cpu_lacks_are_never_used() {
    use super::{FloatMatrix, LegacyMatrix};
    let q4k = random_blocks(GgmlDType::Q4K, 4, QK_K, 5);
    let f16 = QTensor::quantize(
        &Tensor::from_vec(noise(6, 4 * 64), (4, 64), &Device::Cpu).unwrap(),
        GgmlDType::F16,
    )
    .unwrap();
    let f16 = RawTensor::from_qtensor(&f16).unwrap();
    let legacy = LEGACY.map(|dtype| random_legacy_blocks(dtype, 4, 64, 7));
    for kernels in [Kernels::AvxVnni, Kernels::Avx512Vnni, Kernels::Avx2] {
        let runs = Kernels::available().contains(&kernels);
        assert_eq!(QMatrix::new(&q4k, kernels).is_some(), runs, "{kernels:?}");
        assert_eq!(
            FloatMatrix::new(&f16, kernels).is_some(),
            runs,
            "{kernels:?}"
        );
        for weights in &legacy {
            let matrix = LegacyMatrix::new(weights, kernels);
            assert_eq!(matrix.is_some(), runs, "{:?} {kernels:?}", weights.dtype());
        }
    }
}

/// `blocks` blocks of `block` values for the quantizers: smooth values, then a block of exact
/// halves after scaling (127 · k/254), one of zeros, one with ties of magnitude; the rest
/// smooth.
#[cfg(target_arch = "x86_64")]
fn quantizer_inputs(block: usize, blocks: usize, seed: u64) -> Vec<f32> {
    let mut xs = noise(seed, blocks * block);
    for (i, v) in xs[block..2 * block].iter_mut().enumerate() {
        *v = (i as f32 - (block / 2) as f32) / 254.0;
    }
    xs[2 * block..3 * block].fill(0.0);
    xs[3 * block + 5] = -2.0;
    xs[3 * block + 9] = 2.0;
    xs
}

#[cfg(target_arch = "x86_64")]
#[test]
fn simd_quantization_is_candles() {
    if !super::x86::has_avx2() {
        return;
    }
    let xs = quantizer_inputs(QK_K, 4, 11);
    let mut scalar = vec![super::blocks::BlockQ8K::ZERO; 4];
    let mut simd = vec![super::blocks::BlockQ8K::ZERO; 4];
    super::blocks::quantize_q8k(&xs, &mut scalar);
    // SAFETY: AVX2 checked above.
    unsafe { super::x86::quantize_q8k(&xs, &mut simd) };
    for (a, b) in scalar.iter().zip(&simd) {
        assert_eq!(a.d, b.d);
        assert_eq!(a.qs, b.qs);
        assert_eq!(a.bsums, b.bsums);
    }
    // And the scalar one is Candle's.
    let theirs = QTensor::quantize(
        &Tensor::from_vec(xs.clone(), (4, QK_K), &Device::Cpu).unwrap(),
        GgmlDType::Q8K,
    )
    .unwrap();
    let ours: Vec<u8> = scalar
        .iter()
        .flat_map(|b| {
            let mut bytes = b.d.to_le_bytes().to_vec();
            bytes.extend(b.qs.iter().map(|&q| q as u8));
            bytes.extend(b.bsums.iter().flat_map(|s| s.to_le_bytes()));
            bytes
        })
        .collect();
    assert_eq!(ours, theirs.data().unwrap().to_vec());
}

/// Continuous batching stacks the rows of several streams: each row's product must not
/// depend on the rows beside it, or a stream's tokens would depend on who else runs.
/// VNNI is bit-exact; AVX2 sums a group of 4 rows in another order, within the last bit.
#[test]
fn each_row_is_the_same_alone_or_among_others() {
    let (rows, cols) = (24, 2 * QK_K);
    for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
        let weights = random_blocks(dtype, rows, cols, 5);
        for kernels in kernels_to_test() {
            for m in [2, 3, 8, 9, 17, 40] {
                let x = noise(m as u64, m * cols);
                let together = ours(&weights, kernels, &x, m);
                for (i, row) in x.chunks_exact(cols).enumerate() {
                    let alone = ours(&weights, kernels, row, 1);
                    let diff = alone
                        .iter()
                        .zip(&together[i * rows..(i + 1) * rows])
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    let scale = alone.iter().fold(0f32, |a, v| a.max(v.abs()));
                    assert!(
                        diff <= 1e-6 * scale,
                        "{dtype:?} {kernels:?}: row {i} of {m} differs by {diff} (scale {scale})"
                    );
                }
            }
        }
    }
}

/// F32, F16 and BF16 matrices, read in place: against an f64 product of the same values
/// (Candle dequantizes these to f32 and multiplies; the sums differ only in order).
#[test]
fn float_products_match_f64() {
    use super::FloatMatrix;
    // Rows past a group of 48 and strips of 3; columns past a prompt pass of 8192 (a
    // multiple of 16 for AVX-512's lanes, and one of only 8), and a width that is not a
    // multiple of 8 (the portable path).
    for (rows, cols) in [(53, 528), (53, 520), (7, 8208), (5, 8200), (7, 24), (5, 12)] {
        let values = noise(5, rows * cols);
        for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16] {
            let dense = Tensor::from_vec(values.clone(), (rows, cols), &Device::Cpu).unwrap();
            let tensor = QTensor::quantize(&dense, dtype).unwrap();
            let weights = RawTensor::from_qtensor(&tensor).unwrap();
            // The values as stored (rounded to the format), for the exact product.
            let stored: Vec<f32> = tensor
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for m in [1, 2, 3, 4, 5, 8, 9, 16, 17, 33] {
                let x = noise(77 + m as u64, m * cols);
                let exact: Vec<f32> = (0..m)
                    .flat_map(|i| (0..rows).map(move |r| (i, r)))
                    .map(|(i, r)| {
                        let w = &stored[r * cols..(r + 1) * cols];
                        let x = &x[i * cols..(i + 1) * cols];
                        w.iter()
                            .zip(x)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum::<f64>() as f32
                    })
                    .collect();
                for kernels in kernels_to_test() {
                    let matrix = FloatMatrix::new(&weights, kernels).expect("a float matrix");
                    let what = format!("{dtype:?} {rows}x{cols} m={m} {kernels:?}");
                    assert_close(&matrix.matmul(&x, m), &exact, &what);
                }
            }
        }
    }
}

/// A row's float product is the same, bit for bit, alone or among others: one matrix takes
/// one lane width for every pass. Rows 25 to 29 end in strips of one to five rows (prompts'
/// strips are six with AVX-512).
#[test]
fn float_rows_are_the_same_alone_or_among_others() {
    use super::FloatMatrix;
    let shapes = [
        (29, 528),
        (29, 520),
        (29, 1040),
        (25, 528),
        (26, 528),
        (27, 528),
        (28, 528),
    ];
    for (rows, cols) in shapes {
        let dense = Tensor::from_vec(noise(8, rows * cols), (rows, cols), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16] {
            let tensor = QTensor::quantize(&dense, dtype).unwrap();
            let weights = RawTensor::from_qtensor(&tensor).unwrap();
            for kernels in kernels_to_test() {
                let matrix = FloatMatrix::new(&weights, kernels).expect("a float matrix");
                let what = format!("{dtype:?} {cols} columns {kernels:?}");
                let ms = [2, 5, 9, 17, 40];
                assert_rows_alone_as_together(|x, m| matrix.matmul(x, m), rows, cols, &ms, &what);
            }
        }
    }
}

const LEGACY: [GgmlDType; 5] = [
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
];

/// Legacy blocks of random bits (Q8_0's -128, every fifth-bit pattern), with small finite
/// f16 scales and minimums.
pub(super) fn random_legacy_blocks(
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    seed: u64,
) -> RawTensor {
    let block_bytes = dtype.type_size();
    let n_blocks = rows * cols / dtype.block_size();
    let bits = noise(seed, n_blocks * block_bytes);
    let mut bytes: Vec<u8> = bits.iter().map(|v| ((v + 1.0) * 128.0) as u8).collect();
    let factors = noise(seed + 1, n_blocks * 2);
    let has_min = matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_1);
    for (b, block) in bytes.chunks_exact_mut(block_bytes).enumerate() {
        block[..2].copy_from_slice(&half::f16::from_f32(factors[2 * b] * 0.01).to_le_bytes());
        if has_min {
            let m = half::f16::from_f32(factors[2 * b + 1] * 0.1);
            block[2..4].copy_from_slice(&m.to_le_bytes());
        }
    }
    RawTensor::new(dtype, vec![rows, cols], WeightBytes::copied(&bytes)).unwrap()
}

/// The product in f64 from the blocks' own fields (d · q + m) and the Q8_0 activations.
fn legacy_exact(weights: &RawTensor, x: &[f32], m: usize) -> Vec<f32> {
    use super::legacy::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0};
    let cols = weights.dims()[1];
    match weights.dtype() {
        GgmlDType::Q8_0 => legacy_exact_of::<BlockQ8_0>(weights, x, m, cols),
        GgmlDType::Q4_0 => legacy_exact_of::<BlockQ4_0>(weights, x, m, cols),
        GgmlDType::Q4_1 => legacy_exact_of::<BlockQ4_1>(weights, x, m, cols),
        GgmlDType::Q5_0 => legacy_exact_of::<BlockQ5_0>(weights, x, m, cols),
        GgmlDType::Q5_1 => legacy_exact_of::<BlockQ5_1>(weights, x, m, cols),
        other => panic!("not a legacy type: {other:?}"),
    }
}

fn legacy_exact_of<B: super::legacy::LegacyBlock>(
    weights: &RawTensor,
    x: &[f32],
    m: usize,
    cols: usize,
) -> Vec<f32> {
    use super::legacy::{quantize_q8_0, BlockQ8_0, QK};
    let blocks: &[B] = super::blocks::as_blocks(weights.bytes().as_bytes()).unwrap();
    let mut acts = vec![
        BlockQ8_0 {
            d: half::f16::ZERO,
            qs: [0; QK]
        };
        m * cols / QK
    ];
    quantize_q8_0(x, &mut acts);
    let per_row = cols / QK;
    let rows = blocks.len() / per_row;
    let mut out = Vec::with_capacity(m * rows);
    for a in acts.chunks_exact(per_row) {
        for w in blocks.chunks_exact(per_row) {
            let mut sum = 0f64;
            for (w, a) in w.iter().zip(a) {
                let d = f64::from(w.d().to_f32());
                let min = f64::from(w.m_bits().to_f32()) + f64::from(B::OFFSET) * d;
                let ad = f64::from(a.d.to_f32());
                for (&q, &y) in w.values().iter().zip(&a.qs) {
                    sum += (d * f64::from(q) + min) * ad * f64::from(y);
                }
            }
            out.push(sum as f32);
        }
    }
    out
}

/// The legacy types against the f64 product of their own blocks, on random bits and on
/// blocks Candle quantized (whose products must also match Candle's: its minimum's term
/// takes the activations' sums rounded to f16: measured up to 2.3e-4 of the largest product).
#[test]
fn legacy_products_match_f64_and_candle() {
    use super::LegacyMatrix;
    // More rows than a group of 24 and pairs of 2; every microkernel shape (m up to 40), and
    // 1 to 5 interleaved groups of eight activation rows with 0 to 7 rows beside them. An
    // even number of blocks a row: Candle's Q4_1 and Q5 products assert it.
    let (rows, cols) = (29, 192);
    for (t, dtype) in LEGACY.into_iter().enumerate() {
        let random = random_legacy_blocks(dtype, rows, cols, 60 + t as u64);
        let dense = Tensor::from_vec(
            noise(40 + t as u64, rows * cols),
            (rows, cols),
            &Device::Cpu,
        )
        .unwrap();
        let quantized =
            RawTensor::from_qtensor(&QTensor::quantize(&dense, dtype).unwrap()).unwrap();
        for (source, weights) in [("random bits", &random), ("quantized", &quantized)] {
            for m in [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 24, 31, 33, 40] {
                let x = noise(500 + m as u64, m * cols);
                let exact = legacy_exact(weights, &x, m);
                let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
                let theirs = candle_product(weights, &xt);
                let candle_bound = match dtype {
                    GgmlDType::Q4_1 | GgmlDType::Q5_1 => 1e-3,
                    _ => 1e-5,
                };
                for kernels in kernels_to_test() {
                    let matrix = LegacyMatrix::new(weights, kernels).expect("a legacy matrix");
                    let product = matrix.matmul(&x, m);
                    let what = format!("{dtype:?} {source} m={m} {kernels:?}");
                    assert_close(&product, &exact, &what);
                    if source == "quantized" {
                        assert_within(&product, &theirs, candle_bound, &what);
                    }
                }
            }
        }
    }
}

/// The 32-value types with every value at its largest magnitude (Q8_0's -128, the others'
/// 15 or 31) times activations at ±127 throughout: the sums AVX2's 16-bit pairs and chains
/// must hold exactly.
#[test]
fn legacy_largest_values_sum_exactly() {
    use super::LegacyMatrix;
    let (rows, cols) = (16, 128);
    for (t, dtype) in LEGACY.into_iter().enumerate() {
        let mut bytes = random_legacy_blocks(dtype, rows, cols, 30 + t as u64)
            .bytes()
            .as_bytes()
            .to_vec();
        // Keep each block's factors (its first 2 or 4 bytes); all value bits set, or -128.
        let factors = match dtype {
            GgmlDType::Q4_1 | GgmlDType::Q5_1 => 4,
            _ => 2,
        };
        let fill = if dtype == GgmlDType::Q8_0 { 0x80 } else { 0xFF };
        for block in bytes.chunks_exact_mut(dtype.type_size()) {
            block[factors..].fill(fill);
        }
        let weights = RawTensor::new(dtype, vec![rows, cols], WeightBytes::copied(&bytes)).unwrap();
        for m in [1, 8, 16, 33] {
            for value in [1.0f32, -1.0] {
                let x = vec![value; m * cols];
                let exact = legacy_exact(&weights, &x, m);
                for kernels in kernels_to_test() {
                    let matrix = LegacyMatrix::new(&weights, kernels).expect("a legacy matrix");
                    let what = format!("{dtype:?} m={m} x={value} {kernels:?}");
                    assert_close(&matrix.matmul(&x, m), &exact, &what);
                }
            }
        }
    }
}

/// |ours − theirs| ≤ `bound` · the largest |theirs|, element by element.
fn assert_within(ours: &[f32], theirs: &[f32], bound: f32, what: &str) {
    let scale = theirs.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!(
            (a - b).abs() <= bound * scale,
            "{what}: element {i}: ours {a}, theirs {b} (scale {scale})"
        );
    }
}

/// For each of `ms` activation rows together, each row's products are the same bits as
/// that row's alone (`matmul(x, m)` gives (m, `rows`)).
fn assert_rows_alone_as_together(
    matmul: impl Fn(&[f32], usize) -> Vec<f32>,
    rows: usize,
    cols: usize,
    ms: &[usize],
    what: &str,
) {
    for &m in ms {
        let x = noise(m as u64, m * cols);
        let together = matmul(&x, m);
        for (i, row) in x.chunks_exact(cols).enumerate() {
            assert_eq!(
                matmul(row, 1),
                together[i * rows..(i + 1) * rows],
                "{what}: row {i} of {m}"
            );
        }
    }
}

/// A K-quant row's product is the same, bit for bit, alone or among others: decoding
/// streams in a group of four or a padded eight, prompt rows in groups of eight or sixteen
/// and beside them (a group of four, the AVX2 rows, a padded group), across tiles of
/// activations; the batcher promises each stream its results alone.
#[test]
fn kquant_rows_are_the_same_alone_or_among_others() {
    let (rows, cols) = (40, 512);
    for (t, dtype) in K_QUANTS.into_iter().enumerate() {
        let weights = random_blocks(dtype, rows, cols, 70 + t as u64);
        for kernels in kernels_to_test() {
            let matrix = QMatrix::new(&weights, kernels).expect("a K-quant matrix");
            let what = format!("{dtype:?} {kernels:?}");
            let ms = [2, 3, 4, 5, 7, 8, 9, 12, 17, 33, 34, 36, 40, 65, 75, 128];
            assert_rows_alone_as_together(|x, m| matrix.matmul(x, m), rows, cols, &ms, &what);
        }
    }
}

/// A row's product is the same, bit for bit, alone or among others (decoding a few, in a
/// group of eight or beside one): the batcher promises each stream its results alone.
#[test]
fn legacy_rows_are_the_same_alone_or_among_others() {
    use super::LegacyMatrix;
    // 29 weight rows: groups of eight (decoding) and rows beside them.
    let (rows, cols) = (29, 192);
    for (t, dtype) in LEGACY.into_iter().enumerate() {
        let weights = random_legacy_blocks(dtype, rows, cols, 90 + t as u64);
        for kernels in kernels_to_test() {
            let matrix = LegacyMatrix::new(&weights, kernels).expect("a legacy matrix");
            let what = format!("{dtype:?} {kernels:?}");
            let ms = [2, 4, 5, 8, 9, 17, 40];
            assert_rows_alone_as_together(|x, m| matrix.matmul(x, m), rows, cols, &ms, &what);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn simd_q8_0_quantization_is_the_scalar_one() {
    if !super::x86::has_avx2() {
        return;
    }
    use super::legacy::{quantize_q8_0, BlockQ8_0, QK};
    // The quantizers' common cases, and values no model should make: NaN, infinities,
    // subnormals, the largest finite ones.
    let mut xs = quantizer_inputs(QK, 12, 12);
    xs[4 * QK + 3] = f32::NAN;
    xs[5 * QK + 7] = f32::INFINITY;
    xs[6 * QK + 1] = f32::NEG_INFINITY;
    xs[7 * QK..8 * QK].fill(1e-42);
    xs[8 * QK + 2] = f32::MAX;
    xs[9 * QK + 4] = -f32::MAX;
    xs[10 * QK..11 * QK].fill(f32::NAN);
    xs[11 * QK] = 1e-40;
    let blank = BlockQ8_0 {
        d: half::f16::ZERO,
        qs: [0; QK],
    };
    let mut scalar = vec![blank.clone(); 12];
    let mut simd = vec![blank; 12];
    quantize_q8_0(&xs, &mut scalar);
    // SAFETY: AVX2 checked above.
    unsafe { super::x86::quantize_q8_0(&xs, &mut simd) };
    for (i, (a, b)) in scalar.iter().zip(&simd).enumerate() {
        assert_eq!(a.d.to_bits(), b.d.to_bits(), "block {i}");
        assert_eq!(a.qs, b.qs, "block {i}");
    }
}
