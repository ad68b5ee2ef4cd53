//! The pass's elementwise steps over whole activation rows (the residual adds, SwiGLU), on
//! the rayon pool that runs the matrix kernels. Candle's ops on tensors this large (64Ki
//! values and more) run on a barrier pool of its own, whose workers spin 25,000 times
//! after every op before they sleep: on two cores, one of them took a core from the matrix
//! product that follows, and the caller spun waiting for it. The values are Candle's, bit
//! for bit: the same f32 operations on each element.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task: large enough that a task's overhead stays small beside it.
const CHUNK: usize = 16 * 1024;

/// `a + b`, for two tensors of one shape.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add)
}

/// `silu(gate) · up`, where the last dimension of `gate_up` holds `width` gate values and
/// then `width` up values (Phi-3's fused `ffn_up`): a tensor of `width` in that dimension.
pub fn swiglu(gate_up: &Tensor, width: usize) -> Result<Tensor> {
    gate_up.contiguous()?.apply_op1_no_bwd(&SwiGlu { width })
}

/// A contiguous f32 tensor's values.
fn values<'a>(name: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{name} takes f32 values")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{name} takes contiguous values")
    };
    Ok(&data[start..end])
}

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "add"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if a_layout.shape() != b_layout.shape() {
            candle_core::bail!("add: {:?} and {:?}", a_layout.shape(), b_layout.shape())
        }
        let (a, b) = (values("add", a, a_layout)?, values("add", b, b_layout)?);
        // An indexed collect writes each value once, into the result's own memory.
        let out: Vec<f32> = a
            .par_iter()
            .zip(b)
            .with_min_len(CHUNK)
            .map(|(a, b)| a + b)
            .collect();
        Ok((CpuStorage::F32(out), a_layout.shape().clone()))
    }
}

struct SwiGlu {
    width: usize,
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = self.width;
        let mut dims = layout.shape().dims().to_vec();
        if dims.last() != Some(&(2 * width)) {
            candle_core::bail!("swiglu: {dims:?} against two halves of {width}")
        }
        let gate_up = values("swiglu", storage, layout)?;
        let rows = gate_up.len() / (2 * width).max(1);
        let mut out = vec![0f32; rows * width];
        // Whole rows per task, as many as make about a chunk.
        let per_task = (CHUNK / width.max(1)).max(1);
        out.par_chunks_mut(per_task * width)
            .zip(gate_up.par_chunks(per_task * 2 * width))
            .for_each(|(out, gate_up)| {
                for (out, row) in out
                    .chunks_exact_mut(width)
                    .zip(gate_up.chunks_exact(2 * width))
                {
                    let (gate, up) = row.split_at(width);
                    for (o, (g, u)) in out.iter_mut().zip(gate.iter().zip(up)) {
                        // Candle's silu, then its product.
                        *o = g / (1.0 + (-g).exp()) * u;
                    }
                }
            });
        *dims.last_mut().expect("checked above") = width;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// Values in [-8, 8): the sigmoid's whole range, saturated at both ends.
    fn noise(seed: u64, n: usize) -> Vec<f32> {
        crate::testing::noise(seed, n)
            .iter()
            .map(|v| 8.0 * v)
            .collect()
    }

    /// The same bits as Candle's ops, below and above the size at which Candle's own run on
    /// its pool, and for rows that do not fill a task.
    #[test]
    fn elementwise_steps_give_candles_bits() {
        for (rows, width) in [(1, 3), (3, 8192), (17, 5000), (64, 3072)] {
            let gate_up = Tensor::from_vec(
                noise(1, rows * 2 * width),
                (1, rows, 2 * width),
                &Device::Cpu,
            )
            .unwrap();
            let ours = swiglu(&gate_up, width).unwrap();
            let gate = gate_up.narrow(D::Minus1, 0, width).unwrap();
            let up = gate_up.narrow(D::Minus1, width, width).unwrap();
            let candles = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert_eq!(ours.dims(), candles.dims());
            assert_eq!(bits(&ours), bits(&candles), "swiglu {rows}x{width}");

            let a =
                Tensor::from_vec(noise(2, rows * width), (1, rows, width), &Device::Cpu).unwrap();
            let b =
                Tensor::from_vec(noise(3, rows * width), (1, rows, width), &Device::Cpu).unwrap();
            assert_eq!(
                bits(&add(&a, &b).unwrap()),
                bits(&(&a + &b).unwrap()),
                "add {rows}x{width}"
            );
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let a = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((4, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(add(&a, &b).is_err());
        assert!(swiglu(&a, 3).is_err());
    }
}
