//! Token embeddings kept as the file stores them: a lookup converts just the rows it needs,
//! instead of holding the whole table in f32 (394 MB for Phi-3-mini, 1.2 GB for Phi-4-mini's
//! vocabulary).

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Result, Tensor};

use crate::quant::{FloatFormat, RawTensor, WeightBytes};

/// Rows converted to f32 on lookup.
#[derive(Debug)]
pub struct Embedding {
    table: WeightBytes,
    dtype: GgmlDType,
    row_bytes: usize,
    width: usize,
}

impl Embedding {
    pub fn new(table: &RawTensor) -> Result<Self> {
        let &[rows, width] = table.dims() else {
            candle_core::bail!(
                "token_embd.weight has shape {:?}, not two dimensions",
                table.dims()
            )
        };
        let dtype = table.dtype();
        // Whole blocks, `rows` of them: `RawTensor` guarantees it.
        let row_bytes = width / dtype.block_size() * dtype.type_size();
        debug_assert_eq!(table.bytes().as_bytes().len(), rows * row_bytes);
        Ok(Embedding {
            table: table.bytes().clone(),
            dtype,
            row_bytes,
            width,
        })
    }

    /// The rows of `ids`, shape (ids, width).
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        let (dtype, row_bytes, width) = (self.dtype, self.row_bytes, self.width);
        let data = self.table.as_bytes();
        let mut out = vec![0f32; ids.len() * width];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(width)) {
            let start = id as usize * row_bytes;
            let Some(bytes) = data.get(start..start + row_bytes) else {
                candle_core::bail!("token id {id} is outside the embedding table")
            };
            dequantize_row(dtype, bytes, row)?;
        }
        Tensor::from_vec(out, (ids.len(), width), &Device::Cpu)
    }
}

fn dequantize_row(dtype: GgmlDType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    if let Some(format) = FloatFormat::of(dtype) {
        format.decode(bytes, out);
        return Ok(());
    }
    match dtype {
        GgmlDType::Q4_0 => blocks::<BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => blocks::<BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => blocks::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => blocks::<BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => blocks::<BlockQ8_0>(bytes, out),
        GgmlDType::Q8_1 => blocks::<BlockQ8_1>(bytes, out),
        GgmlDType::Q2K => blocks::<BlockQ2K>(bytes, out),
        GgmlDType::Q3K => blocks::<BlockQ3K>(bytes, out),
        GgmlDType::Q4K => blocks::<BlockQ4K>(bytes, out),
        GgmlDType::Q5K => blocks::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => blocks::<BlockQ6K>(bytes, out),
        GgmlDType::Q8K => blocks::<BlockQ8K>(bytes, out),
        other => candle_core::bail!("no row dequantization for {other:?}"),
    }
}

fn blocks<T: GgmlType>(bytes: &[u8], out: &mut [f32]) -> Result<()> {
    // SAFETY: ggml blocks are plain old data (integers and f16s, no padding invariants), and
    // `align_to` only hands out the correctly aligned middle part.
    let (head, blocks, tail) = unsafe { bytes.align_to::<T>() };
    if head.is_empty() && tail.is_empty() && blocks.len() * T::BLCK_SIZE == out.len() {
        T::to_float(blocks, out);
        return Ok(());
    }
    candle_core::bail!("misaligned or short embedding row ({} bytes)", bytes.len())
}
