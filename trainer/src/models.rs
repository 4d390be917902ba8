//! The models a job can train: an MLP of configurable widths and a small CNN, built from
//! candle-nn layers over the parameters of a [`ParameterSet`].

use candle_core::{Device, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, Module};
use cohort_spec::train::{ModelKind, ModelSpec};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Result, TrainerError};
use crate::parameters::{Initialization, ParameterSet};

/// A classifier of square grey-scale images.
#[derive(Debug, Clone)]
pub struct Model {
    /// Architecture, for logs and checkpoints.
    kind: ModelKind,
    /// 3x3 convolutions (padding 1), each followed by ReLU and a 2x2 max-pool; empty for an MLP.
    convolutions: Vec<Conv2d>,
    /// Dense layers, ReLU between them, the last one producing the logits.
    dense: Vec<Linear>,
    /// Every trainable parameter, in flat order.
    parameters: ParameterSet,
    /// Height and width of the input images.
    image_shape: (usize, usize),
}

impl Model {
    /// Builds the model `spec` describes for `image_shape` images and `classes` classes, with
    /// parameters drawn from `spec.seed`.
    pub fn new(
        spec: &ModelSpec,
        image_shape: (usize, usize),
        classes: usize,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let mut parameters = ParameterSet::new(device.clone());
        let mut convolutions = Vec::new();
        let (mut height, mut width) = image_shape;
        let mut channels = 1;
        for (index, &out_channels) in spec.convolution_channels().iter().enumerate() {
            let out_channels = out_channels as usize;
            if height < 2 || width < 2 {
                return Err(TrainerError::Config(format!(
                    "model.channels: block {index} would pool a {height} x {width} image, \
                     expected at least 2 x 2"
                )));
            }
            let fan_in = channels * 9;
            let weight = parameters.add(
                format!("convolutions.{index}.weight"),
                (out_channels, channels, 3, 3),
                Initialization::HeUniform { fan_in },
                &mut rng,
            )?;
            let bias = parameters.add(
                format!("convolutions.{index}.bias"),
                out_channels,
                Initialization::Zeros,
                &mut rng,
            )?;
            let config = Conv2dConfig {
                padding: 1,
                ..Conv2dConfig::default()
            };
            convolutions.push(Conv2d::new(weight, Some(bias), config));
            channels = out_channels;
            height /= 2;
            width /= 2;
        }
        let mut features = channels * height * width;
        let mut dense = Vec::new();
        let widths = spec.hidden.iter().map(|&w| w as usize).chain([classes]);
        for (index, out_features) in widths.enumerate() {
            let weight = parameters.add(
                format!("dense.{index}.weight"),
                (out_features, features),
                Initialization::HeUniform { fan_in: features },
                &mut rng,
            )?;
            let bias = parameters.add(
                format!("dense.{index}.bias"),
                out_features,
                Initialization::Zeros,
                &mut rng,
            )?;
            dense.push(Linear::new(weight, Some(bias)));
            features = out_features;
        }
        tracing::debug!(
            kind = ?spec.kind,
            parameters = parameters.element_count(),
            "model built"
        );
        Ok(Self {
            kind: spec.kind,
            convolutions,
            dense,
            parameters,
            image_shape,
        })
    }

    /// Returns the architecture.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// Returns the trainable parameters.
    pub fn parameters(&self) -> &ParameterSet {
        &self.parameters
    }
}

impl Module for Model {
    /// Maps a `[batch, height * width]` batch of normalised images to `[batch, classes]` logits.
    fn forward(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let mut activations = images.clone();
        if !self.convolutions.is_empty() {
            let batch = images.dim(0)?;
            let (height, width) = self.image_shape;
            activations = activations.reshape((batch, 1, height, width))?;
            for convolution in &self.convolutions {
                activations = convolution.forward(&activations)?.relu()?.max_pool2d(2)?;
            }
            activations = activations.flatten_from(1)?;
        }
        let last = self.dense.len() - 1;
        for (index, layer) in self.dense.iter().enumerate() {
            activations = layer.forward(&activations)?;
            if index != last {
                activations = activations.relu()?;
            }
        }
        Ok(activations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlp_shapes_and_parameter_count_match_the_spec() {
        let spec = ModelSpec {
            hidden: vec![32, 16],
            ..ModelSpec::default()
        };
        let model = Model::new(&spec, (28, 28), 10, &Device::Cpu).unwrap();
        assert_eq!(
            model.parameters().element_count() as u64,
            spec.parameter_count(28, 10)
        );
        let names: Vec<_> = model
            .parameters()
            .iter()
            .map(|p| p.name().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "dense.0.weight",
                "dense.0.bias",
                "dense.1.weight",
                "dense.1.bias",
                "dense.2.weight",
                "dense.2.bias"
            ]
        );
        let images = Tensor::zeros((5, 784), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.forward(&images).unwrap().dims(), &[5, 10]);
    }

    #[test]
    fn cnn_shapes_and_parameter_count_match_the_spec() {
        let spec = ModelSpec {
            kind: ModelKind::Cnn,
            hidden: vec![24],
            channels: Some(vec![4, 8]),
            seed: 3,
        };
        let model = Model::new(&spec, (28, 28), 10, &Device::Cpu).unwrap();
        assert_eq!(
            model.parameters().element_count() as u64,
            spec.parameter_count(28, 10)
        );
        let images = Tensor::ones((3, 784), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.forward(&images).unwrap().dims(), &[3, 10]);
    }

    #[test]
    fn mlp_forward_matches_a_hand_computed_reference() {
        let spec = ModelSpec {
            hidden: vec![3],
            ..ModelSpec::default()
        };
        let model = Model::new(&spec, (1, 2), 2, &Device::Cpu).unwrap();
        let flat: Vec<f32> = vec![
            1.0, -1.0, 0.5, 0.5, -2.0, 1.0, // dense.0.weight [3, 2]
            0.0, 0.1, 0.2, // dense.0.bias
            1.0, 1.0, 1.0, -1.0, 0.0, 2.0, // dense.1.weight [2, 3]
            0.5, -0.5, // dense.1.bias
        ];
        model.parameters().write_values(&flat).unwrap();
        let x = [2.0f32, 1.0];
        let hidden: Vec<f32> = (0..3)
            .map(|i| (flat[2 * i] * x[0] + flat[2 * i + 1] * x[1] + flat[6 + i]).max(0.0))
            .collect();
        let expected: Vec<f32> = (0..2)
            .map(|o| (0..3).map(|i| flat[9 + 3 * o + i] * hidden[i]).sum::<f32>() + flat[15 + o])
            .collect();
        let input = Tensor::new(&[x], &Device::Cpu).unwrap();
        let logits = model.forward(&input).unwrap().to_vec2::<f32>().unwrap();
        for (got, want) in logits[0].iter().zip(&expected) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn too_many_pools_for_the_image_is_an_error() {
        let spec = ModelSpec {
            kind: ModelKind::Cnn,
            channels: Some(vec![2, 2, 2]),
            ..ModelSpec::default()
        };
        assert!(Model::new(&spec, (4, 4), 10, &Device::Cpu).is_err());
    }
}
