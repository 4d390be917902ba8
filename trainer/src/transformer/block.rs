//! One transformer block (pre-LayerNorm causal self-attention and GELU MLP) as one rank of a
//! tensor-parallel group computes it, and the LayerNorm and linear layers it is made of.

use candle_core::{D, DType, Tensor};

use super::LAYER_NORM_EPSILON;
use super::tensor_parallel::TensorParallel;
use crate::error::Result;

/// A LayerNorm over the last dimension, from candle operations that all have a backward.
pub(super) struct LayerNorm {
    /// Scale, `[width]`.
    pub(super) weight: Tensor,
    /// Shift, `[width]`.
    pub(super) bias: Tensor,
}

impl LayerNorm {
    /// Normalises `x` over its last dimension, then scales and shifts it.
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let deviation = (variance + LAYER_NORM_EPSILON)?.sqrt()?;
        centred
            .broadcast_div(&deviation)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// The local part of one block.
pub(super) struct Block {
    /// LayerNorm before attention (replicated).
    pub(super) ln1: LayerNorm,
    /// Query, key and value weights (this rank's rows) and biases.
    pub(super) query: (Tensor, Tensor),
    /// See `query`.
    pub(super) key: (Tensor, Tensor),
    /// See `query`.
    pub(super) value: (Tensor, Tensor),
    /// Output projection weight (this rank's columns).
    pub(super) output_weight: Tensor,
    /// Output projection bias (replicated, added after the all-reduce).
    pub(super) output_bias: Tensor,
    /// LayerNorm before the MLP (replicated).
    pub(super) ln2: LayerNorm,
    /// MLP expansion weight and bias (this rank's rows).
    pub(super) up: (Tensor, Tensor),
    /// MLP contraction weight (this rank's columns).
    pub(super) down_weight: Tensor,
    /// MLP contraction bias (replicated, added after the all-reduce).
    pub(super) down_bias: Tensor,
    /// Attention heads this rank computes.
    pub(super) local_heads: usize,
    /// Width of one head.
    pub(super) head_dimension: usize,
}

/// Returns `x W^T + b` for a `[rows, in]` input and a `(out, in)` weight, computed in
/// `compute` (the f32 weights are cast on use: mixed precision's working copy) and returned
/// in f32.
pub(super) fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    compute: DType,
) -> candle_core::Result<Tensor> {
    let product = x
        .to_dtype(compute)?
        .matmul(&weight.to_dtype(compute)?.t()?)?;
    let product = match bias {
        Some(bias) => product.broadcast_add(&bias.to_dtype(compute)?)?,
        None => product,
    };
    product.to_dtype(DType::F32)
}

impl Block {
    /// Maps the residual stream `[batch, sequence, width]` through attention and the MLP.
    /// Matrix products run in `compute` (f32, bf16 or f16); LayerNorms, the softmax, the
    /// residual stream and the tensor-parallel all-reduces stay in f32.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        tensor_parallel: &TensorParallel,
        mask: &Tensor,
        compute: DType,
    ) -> Result<Tensor> {
        let (batch, sequence, width) = x.dims3()?;
        let rows = batch * sequence;
        let local_width = self.local_heads * self.head_dimension;

        let normed = self.ln1.forward(x)?.reshape((rows, width))?;
        let shared = tensor_parallel.copy_to_region(&normed)?;
        let heads = |(weight, bias): &(Tensor, Tensor)| -> candle_core::Result<Tensor> {
            linear(&shared, weight, Some(bias), compute)?
                .to_dtype(compute)?
                .reshape((batch, sequence, self.local_heads, self.head_dimension))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (query, key, value) = (heads(&self.query)?, heads(&self.key)?, heads(&self.value)?);
        let scale = 1.0 / (self.head_dimension as f64).sqrt();
        let scores = query
            .matmul(&key.t()?)?
            .to_dtype(DType::F32)?
            .affine(scale, 0.0)?
            .broadcast_add(&mask.narrow(0, 0, sequence)?.narrow(1, 0, sequence)?)?;
        let probabilities = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let attended = probabilities
            .to_dtype(compute)?
            .matmul(&value)?
            .to_dtype(DType::F32)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, local_width))?;
        let partial = linear(&attended, &self.output_weight, None, compute)?;
        let projected = tensor_parallel
            .reduce_from_region(&partial)?
            .broadcast_add(&self.output_bias)?;
        let x = (x + projected.reshape((batch, sequence, width))?)?;

        let normed = self.ln2.forward(&x)?.reshape((rows, width))?;
        let shared = tensor_parallel.copy_to_region(&normed)?;
        let hidden = linear(&shared, &self.up.0, Some(&self.up.1), compute)?.gelu()?;
        let partial = linear(&hidden, &self.down_weight, None, compute)?;
        let projected = tensor_parallel
            .reduce_from_region(&partial)?
            .broadcast_add(&self.down_bias)?;
        Ok((x + projected.reshape((batch, sequence, width))?)?)
    }
}
