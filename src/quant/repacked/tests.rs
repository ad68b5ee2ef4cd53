//! The repacked rows against the file's: the same bits, for every kernel this CPU runs.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::super::blocks::QK_K;
use super::super::tests::{kernels_to_test, noise, random_blocks};
use super::super::{Kernels, QMatrix, RawTensor};

/// The types repacked.
const REPACKED: [GgmlDType; 3] = [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];

/// `dtype` weights of `rows` × `cols`: random bits (every scale, minimum and value
/// pattern) and blocks Candle quantized from smooth values.
fn weights(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> [RawTensor; 2] {
    let dense = Tensor::from_vec(noise(seed, rows * cols), (rows, cols), &Device::Cpu).unwrap();
    let quantized = QTensor::quantize(&dense, dtype).unwrap();
    [
        random_blocks(dtype, rows, cols, seed + 1),
        RawTensor::from_qtensor(&quantized).unwrap(),
    ]
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
                let mapped = QMatrix::new(weights, kernels).unwrap();
                let repacked = QMatrix::new(weights, kernels).unwrap().repack();
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
    // so also every scale at its most negative, 0x80), against activations of ±127: the
    // chains' and totals' largest magnitudes, which must neither wrap nor saturate.
    let (rows, cols) = (16, 2 * QK_K);
    for dtype in REPACKED {
        for byte in [0xFF, 0x80] {
            let bytes = uniform_block(dtype, byte).repeat(rows * cols / QK_K);
            let weights = RawTensor::new(
                dtype,
                vec![rows, cols],
                super::super::WeightBytes::copied(&bytes),
            )
            .unwrap();
            for kernels in x86_kernels() {
                let mapped = QMatrix::new(&weights, kernels).unwrap();
                let repacked = QMatrix::new(&weights, kernels).unwrap().repack();
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
    let q3k = random_blocks(GgmlDType::Q3K, 16, QK_K, 4);
    for kernels in x86_kernels() {
        for weights in [&q4k_12_rows, &q3k] {
            let matrix = QMatrix::new(weights, kernels).unwrap().repack();
            assert_eq!(matrix.repacked_bytes(), 0, "{:?}", weights.dtype());
        }
    }
    let [q4k, _] = weights(GgmlDType::Q4K, 16, 2 * QK_K, 5);
    let matrix = QMatrix::new(&q4k, Kernels::Scalar).unwrap().repack();
    assert_eq!(
        matrix.repacked_bytes(),
        0,
        "the portable kernels read the file's rows"
    );
}
