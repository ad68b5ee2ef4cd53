//! The repacked rows against the file's: the same bits, for every kernel this CPU runs.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::super::blocks::QK_K;
use super::super::tests::{kernels_to_test, noise, random_blocks, random_legacy_blocks};
use super::super::{Kernels, LegacyMatrix, QMatrix, RawTensor};

/// The types repacked.
const REPACKED: [GgmlDType; 4] = [
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q4_0,
];

/// `dtype` weights of `rows` × `cols`: random bits (every scale, minimum and value
/// pattern) and blocks Candle quantized from smooth values.
fn weights(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> [RawTensor; 2] {
    let dense = Tensor::from_vec(noise(seed, rows * cols), (rows, cols), &Device::Cpu).unwrap();
    let quantized = QTensor::quantize(&dense, dtype).unwrap();
    let random = match dtype {
        GgmlDType::Q4_0 => random_legacy_blocks(dtype, rows, cols, seed + 1),
        _ => random_blocks(dtype, rows, cols, seed + 1),
    };
    [random, RawTensor::from_qtensor(&quantized).unwrap()]
}

/// A K-quant or Q4_0 matrix, in the file's layout or repacked.
enum Matrix {
    KQuant(QMatrix),
    Legacy(LegacyMatrix),
}

impl Matrix {
    fn new(weights: &RawTensor, kernels: Kernels, repack: bool) -> Self {
        let matrix = match QMatrix::new(weights, kernels) {
            Some(matrix) => Matrix::KQuant(matrix),
            None => Matrix::Legacy(LegacyMatrix::new(weights, kernels).unwrap()),
        };
        match (matrix, repack) {
            (Matrix::KQuant(m), true) => Matrix::KQuant(m.repack()),
            (Matrix::Legacy(m), true) => Matrix::Legacy(m.repack()),
            (matrix, false) => matrix,
        }
    }

    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        match self {
            Matrix::KQuant(matrix) => matrix.matmul(x, m),
            Matrix::Legacy(matrix) => matrix.matmul(x, m),
        }
    }

    fn repacked_bytes(&self) -> usize {
        match self {
            Matrix::KQuant(matrix) => matrix.repacked_bytes(),
            Matrix::Legacy(matrix) => matrix.repacked_bytes(),
        }
    }
}

fn x86_kernels() -> Vec<Kernels> {
    let mut kernels = kernels_to_test();
    kernels.retain(|k| matches!(k, Kernels::Avx2 | Kernels::AvxVnni | Kernels::Avx512Vnni));
    kernels
}

#[test]
fn repacked_rows_give_the_mapped_rows_bits() {
    for (dtype, (rows, cols)) in REPACKED
        .into_iter()
        .flat_map(|dtype| [(8, QK_K), (24, 3 * QK_K), (40, 2 * QK_K)].map(|shape| (dtype, shape)))
    {
        for (t, weights) in weights(dtype, rows, cols, 11 + rows as u64)
            .iter()
            .enumerate()
        {
            for kernels in x86_kernels() {
                let mapped = Matrix::new(weights, kernels, false);
                let repacked = Matrix::new(weights, kernels, true);
                assert!(repacked.repacked_bytes() > 0, "{kernels:?}: not repacked");
                // Every stream count a pass takes at once (up to four, or eight with
                // AVX-512), the rest after them, prompts' tiles of 64 and the rows past them.
                for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 33, 64, 65, 130] {
                    let x = noise(500 + m as u64, m * cols);
                    let theirs = mapped.matmul(&x, m);
                    let ours = repacked.matmul(&x, m);
                    let what = format!("{dtype:?} {rows}x{cols} weights {t} m={m} {kernels:?}");
                    assert!(theirs.iter().any(|&v| v != 0.0), "{what}: all zero");
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&ours), bits(&theirs), "{what}");
                }
            }
        }
    }
}

/// A block of `dtype` whose every byte is `byte`, with factors 0.5 and 0.25 where they go.
fn uniform_block(dtype: GgmlDType, byte: u8) -> Vec<u8> {
    let mut block = vec![byte; dtype.type_size()];
    let (d, dmin) = (
        half::f16::from_f32(0.5).to_le_bytes(),
        half::f16::from_f32(0.25).to_le_bytes(),
    );
    match dtype {
        GgmlDType::Q6K => {
            let n = block.len();
            block[n - 2..].copy_from_slice(&d);
        }
        GgmlDType::Q4_0 => block[..2].copy_from_slice(&d),
        _ => {
            block[..2].copy_from_slice(&d);
            block[2..4].copy_from_slice(&dmin);
        }
    }
    block
}

#[test]
fn the_largest_values_sum_exactly_repacked() {
    // Every value, scale and minimum at its largest (all bits set; Q6_K's scales then -1,
    // so also every scale at its most negative, 0x80; Q4_0's values 7, then -8 and 0),
    // against activations of ±127: the
    // chains' and totals' largest magnitudes, which must neither wrap nor saturate.
    let (rows, cols) = (16, 2 * QK_K);
    for dtype in REPACKED {
        for byte in [0xFF, 0x80] {
            let bytes = uniform_block(dtype, byte).repeat(rows * cols / dtype.block_size());
            let weights = RawTensor::new(
                dtype,
                vec![rows, cols],
                super::super::WeightBytes::copied(&bytes),
            )
            .unwrap();
            for kernels in x86_kernels() {
                let mapped = Matrix::new(&weights, kernels, false);
                let repacked = Matrix::new(&weights, kernels, true);
                for value in [1.0f32, -1.0] {
                    for m in [1, 4, 8] {
                        let x = vec![value; m * cols];
                        let theirs = mapped.matmul(&x, m);
                        let ours = repacked.matmul(&x, m);
                        let what = format!("{dtype:?} {byte:#x} {kernels:?} m={m} x={value}");
                        assert!(theirs.iter().all(|&v| v != 0.0), "{what}");
                        assert_eq!(ours, theirs, "{what}");
                    }
                }
            }
        }
    }
}

#[test]
fn only_whole_groups_of_eight_rows_of_the_repacked_types_are_repacked() {
    let [q4k_12_rows, _] = weights(GgmlDType::Q4K, 12, QK_K, 3);
    let [q4_0_12_rows, _] = weights(GgmlDType::Q4_0, 12, QK_K, 3);
    let q3k = random_blocks(GgmlDType::Q3K, 16, QK_K, 4);
    let q8_0 = random_legacy_blocks(GgmlDType::Q8_0, 16, QK_K, 4);
    for kernels in x86_kernels() {
        for weights in [&q4k_12_rows, &q4_0_12_rows, &q3k, &q8_0] {
            let matrix = Matrix::new(weights, kernels, true);
            assert_eq!(matrix.repacked_bytes(), 0, "{:?}", weights.dtype());
        }
    }
    for dtype in [GgmlDType::Q4K, GgmlDType::Q4_0] {
        let [weights, _] = weights(dtype, 16, 2 * QK_K, 5);
        let matrix = Matrix::new(&weights, Kernels::Scalar, true);
        assert_eq!(
            matrix.repacked_bytes(),
            0,
            "{dtype:?}: the portable kernels read the file's rows"
        );
    }
}
