//! The product of a dense layer, `x · Wᵀ`, as one candle op with its own backward rule.
//!
//! candle's `x.matmul(&w.t())` differentiates into a product for each argument and a transpose:
//! it computes the gradient of `x` even where nothing needs it (the first layer's input is the
//! data), computes the weight's gradient as `xᵀ · g`, shaped `[in, out]`, and then accumulates
//! that through a transposed, strided view into the `[out, in]` weight's gradient, element by
//! element. [`DenseProduct`] computes the same forward product with candle's own matrix
//! multiply on the same layouts (the logits are bit for bit those of `candle_nn::Linear`), and
//! its backward rule returns the weight's gradient as `gᵀ · x`, already `[out, in]` and
//! contiguous, and the input's gradient only when the input takes part in differentiation.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Shape, Tensor};

/// `x · Wᵀ` for an input `x` of shape `[batch, in]` and a weight `W` of shape `[out, in]`.
pub(super) struct DenseProduct;

impl DenseProduct {
    /// Runs the product on either backend's storage: one call to candle's matrix multiply with
    /// the weight read through its transposed layout, as `Tensor::matmul` would.
    fn product<S: BackendStorage<Device: BackendDevice<Storage = S>>>(
        input: &S,
        input_layout: &Layout,
        weight: &S,
        weight_layout: &Layout,
    ) -> candle_core::Result<(S, Shape)> {
        let (&[batch, features], &[outputs, weight_features]) =
            (input_layout.dims(), weight_layout.dims())
        else {
            candle_core::bail!(
                "dense product of {:?} and {:?}, expected [batch, in] and [out, in]",
                input_layout.dims(),
                weight_layout.dims()
            );
        };
        if features != weight_features {
            candle_core::bail!(
                "dense product of an input of {features} features and a weight of \
                 {weight_features}, expected equal"
            );
        }
        let shape = Shape::from((batch, outputs));
        if batch == 0 || outputs == 0 || features == 0 {
            let zeros = input.device().zeros_impl(&shape, input.dtype())?;
            return Ok((zeros, shape));
        }
        let transposed = weight_layout.transpose(0, 1)?;
        let storage = input.matmul(
            weight,
            (1, batch, outputs, features),
            input_layout,
            &transposed,
        )?;
        Ok((storage, shape))
    }
}

impl CustomOp2 for DenseProduct {
    fn name(&self) -> &'static str {
        "cohort-dense-product"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::product(input, input_layout, weight, weight_layout)
    }

    /// The same product on the GPU. Written against candle's backend traits, so it builds with
    /// and without candle's CUDA kernels (without them no CUDA storage exists and this is never
    /// called).
    fn cuda_fwd(
        &self,
        input: &CudaStorage,
        input_layout: &Layout,
        weight: &CudaStorage,
        weight_layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Self::product(input, input_layout, weight, weight_layout)
    }

    /// With `g` the gradient of the product: the weight's gradient `gᵀ · x` (`[out, in]`) and,
    /// when `x` takes part in differentiation (a variable or computed from one), `x`'s gradient
    /// `g · W`.
    fn bwd(
        &self,
        input: &Tensor,
        weight: &Tensor,
        _product: &Tensor,
        product_gradient: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let input_gradient = if input.track_op() {
            Some(product_gradient.matmul(weight)?)
        } else {
            None
        };
        let weight_gradient = if weight.track_op() {
            Some(product_gradient.t()?.matmul(input)?)
        } else {
            None
        };
        Ok((input_gradient, weight_gradient))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn random(shape: (usize, usize), rng: &mut ChaCha8Rng) -> Tensor {
        let values: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// Largest absolute difference, relative to the largest magnitude of `expected`.
    fn relative_difference(got: &Tensor, expected: &Tensor) -> f32 {
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let expected = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), expected.len());
        let scale = expected.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        got.iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0.0, f32::max)
    }

    #[test]
    fn gradients_match_candles_autograd_of_matmul_on_random_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for (batch, features, outputs) in [(1, 1, 1), (5, 3, 7), (17, 33, 9), (64, 40, 130)] {
            let input = Var::from_tensor(&random((batch, features), &mut rng)).unwrap();
            let weight = Var::from_tensor(&random((outputs, features), &mut rng)).unwrap();
            // A loss that weighs every output differently, so every gradient element matters.
            let mix = random((batch, outputs), &mut rng);

            let reference = input.as_tensor().matmul(&weight.t().unwrap()).unwrap();
            let loss = (&reference * &mix).unwrap().sum_all().unwrap();
            let expected = loss.backward().unwrap();

            let product = input.apply_op2(weight.as_tensor(), DenseProduct).unwrap();
            // The forward product is the same call to the same matrix multiply.
            assert_eq!(
                product.to_vec2::<f32>().unwrap(),
                reference.to_vec2::<f32>().unwrap()
            );
            let loss = (&product * &mix).unwrap().sum_all().unwrap();
            let got = loss.backward().unwrap();
            for tensor in [input.as_tensor(), weight.as_tensor()] {
                let (got, expected) = (got.get(tensor).unwrap(), expected.get(tensor).unwrap());
                assert!(got.is_contiguous());
                let difference = relative_difference(got, expected);
                assert!(
                    difference <= 1e-6,
                    "{batch}x{features}x{outputs}: {difference}"
                );
            }
        }
    }

    #[test]
    fn an_input_outside_differentiation_gets_no_gradient() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let data = random((4, 3), &mut rng);
        let weight = Var::from_tensor(&random((2, 3), &mut rng)).unwrap();
        let loss = data
            .apply_op2(weight.as_tensor(), DenseProduct)
            .unwrap()
            .sum_all()
            .unwrap();
        let gradients = loss.backward().unwrap();
        assert!(gradients.get(&data).is_none());
        // d(sum(x · Wᵀ)) / dW[o, i] = sum over the batch of x[., i], for every o.
        let column_sums = data.sum(0).unwrap().to_vec1::<f32>().unwrap();
        let gradient = gradients.get(weight.as_tensor()).unwrap();
        for row in gradient.to_vec2::<f32>().unwrap() {
            for (got, want) in row.iter().zip(&column_sums) {
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn an_empty_batch_gives_an_empty_product() {
        let input = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        let weight = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let product = input.apply_op2(&weight, DenseProduct).unwrap();
        assert_eq!(product.dims(), &[0, 2]);
        let input = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(input.apply_op2(&weight.t().unwrap(), DenseProduct).is_err());
    }
}
