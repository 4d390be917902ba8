//! The models a job can train: an MLP of configurable widths, a small CNN and the embedding
//! model (a bag of pixel tokens, see [`crate::embedding`]) with a dense head, built from
//! candle-nn layers over the parameters of a [`ParameterSet`]; a dense layer's product is
//! [`dense::DenseProduct`], whose backward pass computes only the gradients the step needs.

mod dense;

use std::ops::Range;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};
use candle_nn::{Conv2d, Conv2dConfig, Module};
use cohort_jobspec::train::{MAX_EMBEDDING_WIDTH, MAX_INTENSITY_LEVELS, ModelKind, ModelSpec};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use self::dense::DenseProduct;
use crate::embedding::EmbeddingBag;
pub use crate::embedding::EmbeddingTable;
use crate::error::{Result, TrainerError};
use crate::parameters::{Initialization, ParameterSet};

/// The layer of one stage.
#[derive(Debug, Clone)]
enum Layer {
    /// The mean of each image's pixel tokens' rows of an embedding table.
    EmbeddingBag(EmbeddingBag),
    /// A 3x3 convolution (padding 1), then ReLU and a 2x2 max-pool.
    Convolution(Conv2d),
    /// A dense layer (its input flattened first), then ReLU unless it produces the logits.
    Dense {
        /// The weight, `[out, in]` (as `candle_nn::Linear` and PyTorch store it).
        weight: Tensor,
        /// The bias, `[out]`.
        bias: Tensor,
        /// Whether ReLU follows.
        relu: bool,
    },
}

/// One layer and the parameters it owns: the unit of the staged backward pass.
#[derive(Debug, Clone)]
struct Stage {
    /// What the stage computes.
    layer: Layer,
    /// Indices of its parameters in the model's [`ParameterSet`].
    parameters: Range<usize>,
}

impl Stage {
    fn forward(&self, input: &Tensor) -> candle_core::Result<Tensor> {
        match &self.layer {
            Layer::EmbeddingBag(bag) => bag.forward(input),
            Layer::Convolution(convolution) => convolution.forward(input)?.relu()?.max_pool2d(2),
            Layer::Dense { weight, bias, relu } => {
                let input = if input.rank() > 2 {
                    input.flatten_from(1)?
                } else {
                    input.clone()
                };
                let output = input.apply_op2(weight, DenseProduct)?.broadcast_add(bias)?;
                if *relu { output.relu() } else { Ok(output) }
            }
        }
    }
}

/// A forward pass cut at stage boundaries: each stage after the first starts from a fresh leaf
/// variable holding the previous stage's output, so the backward pass can run one stage at a
/// time and hand out each stage's gradients as soon as they exist.
#[derive(Debug)]
pub struct StagedForward {
    /// The leaf input of each stage (`None` for the first, whose input is the data).
    inputs: Vec<Option<Var>>,
    /// The output of each stage; the last one holds the logits.
    outputs: Vec<Tensor>,
}

impl StagedForward {
    /// Returns the logits.
    pub fn logits(&self) -> &Tensor {
        &self.outputs[self.outputs.len() - 1]
    }
}

/// The embedding model's first stage over `pixels` pixels: a table of one row per pixel and
/// intensity level, added to `parameters`.
fn embedding_stage(
    spec: &ModelSpec,
    pixels: usize,
    parameters: &mut ParameterSet,
    rng: &mut ChaCha8Rng,
) -> Result<(Stage, EmbeddingTable)> {
    let levels = spec.intensity_levels();
    let embedding_width = spec.embedding_width();
    if !(2..=MAX_INTENSITY_LEVELS).contains(&levels)
        || !(1..=MAX_EMBEDDING_WIDTH).contains(&embedding_width)
    {
        return Err(TrainerError::Config(format!(
            "embedding model with {levels} intensity levels and rows of width \
                 {embedding_width}, expected 2 to {MAX_INTENSITY_LEVELS} levels and a width \
                 of 1 to {MAX_EMBEDDING_WIDTH}"
        )));
    }
    let rows = usize::try_from(spec.embedding_rows(pixels as u64)).map_err(|_| {
        TrainerError::Config(format!(
            "embedding model of {pixels} pixels and {levels} levels: too many rows"
        ))
    })?;
    let embedding_width = embedding_width as usize;
    let parameter_index = parameters.len();
    let table = parameters.add(
        "embedding.table",
        (rows, embedding_width),
        // Uniform in ±sqrt(6 / width). Measured over one epoch of Fashion-MNIST, smaller
        // scales train alike and ±sqrt(6) loses about 3 points of accuracy.
        Initialization::HeUniform {
            fan_in: embedding_width,
        },
        rng,
    )?;
    let stage = Stage {
        layer: Layer::EmbeddingBag(EmbeddingBag::new(table, pixels, levels)),
        parameters: parameter_index..parameters.len(),
    };
    let table = EmbeddingTable {
        parameter_index,
        rows,
        width: embedding_width,
    };
    Ok((stage, table))
}

/// A classifier of square grey-scale images.
#[derive(Debug, Clone)]
pub struct Model {
    /// Architecture, for logs and checkpoints.
    kind: ModelKind,
    /// The embedding bag or the convolution blocks, then dense layers, in forward order.
    stages: Vec<Stage>,
    /// Every trainable parameter, in flat order.
    parameters: ParameterSet,
    /// Height and width of the input images.
    image_shape: (usize, usize),
    /// The embedding model's table; `None` for the other kinds.
    embedding_table: Option<EmbeddingTable>,
}

impl Model {
    /// Builds the model `spec` describes for `image_shape` images and `classes` classes, with
    /// f32 parameters drawn from `spec.seed`.
    pub fn new(
        spec: &ModelSpec,
        image_shape: (usize, usize),
        classes: usize,
        device: &Device,
    ) -> Result<Self> {
        Self::with_dtype(spec, image_shape, classes, device, DType::F32)
    }

    /// Like [`Model::new`], with parameters stored (and computed) as `dtype` on `device`: a
    /// working copy, in bf16 or f16 for mixed precision and on a GPU for a GPU rank. It takes
    /// f32 images and returns logits in `dtype`.
    pub fn with_dtype(
        spec: &ModelSpec,
        image_shape: (usize, usize),
        classes: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let convolution_channels = spec.convolution_channels();
        if spec.hidden.contains(&0) || convolution_channels.contains(&0) || classes == 0 {
            return Err(TrainerError::Config(format!(
                "model with hidden widths {:?}, channels {convolution_channels:?} and {classes} \
                 classes, \
                 expected every width, channel count and the class count above 0",
                spec.hidden
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let mut parameters = ParameterSet::with_dtype(device.clone(), dtype);
        let mut stages = Vec::new();
        let (mut height, mut width) = image_shape;
        let mut channels = 1;
        for (index, &out_channels) in convolution_channels.iter().enumerate() {
            let out_channels = out_channels as usize;
            if height < 2 || width < 2 {
                return Err(TrainerError::Config(format!(
                    "model.channels: block {index} would pool a {height} x {width} image, \
                     expected at least 2 x 2"
                )));
            }
            let first_parameter = parameters.len();
            let weight = parameters.add(
                format!("convolutions.{index}.weight"),
                (out_channels, channels, 3, 3),
                Initialization::HeUniform {
                    fan_in: channels * 9,
                },
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
            stages.push(Stage {
                layer: Layer::Convolution(Conv2d::new(weight, Some(bias), config)),
                parameters: first_parameter..parameters.len(),
            });
            channels = out_channels;
            height /= 2;
            width /= 2;
        }
        let mut features = channels * height * width;
        let mut embedding_table = None;
        if spec.kind == ModelKind::Embedding {
            let (stage, table) = embedding_stage(spec, features, &mut parameters, &mut rng)?;
            stages.push(stage);
            features = table.width;
            embedding_table = Some(table);
        }
        let widths: Vec<usize> = spec
            .hidden
            .iter()
            .map(|&w| w as usize)
            .chain([classes])
            .collect();
        for (index, &out_features) in widths.iter().enumerate() {
            let first_parameter = parameters.len();
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
            stages.push(Stage {
                layer: Layer::Dense {
                    weight,
                    bias,
                    relu: index + 1 < widths.len(),
                },
                parameters: first_parameter..parameters.len(),
            });
            features = out_features;
        }
        tracing::debug!(
            kind = ?spec.kind,
            parameters = parameters.element_count(),
            "model built"
        );
        Ok(Self {
            kind: spec.kind,
            stages,
            parameters,
            image_shape,
            embedding_table,
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

    /// Returns where the embedding model's table is and its shape; `None` for an MLP or a CNN.
    pub fn embedding_table(&self) -> Option<EmbeddingTable> {
        self.embedding_table
    }

    /// Fills `rows` (cleared first) with the sorted, unique rows of the embedding table that a
    /// batch touches: exactly the rows the forward pass reads, so the table's gradient is zero
    /// outside them. `images` holds `batch` normalised images of `height x width` values each
    /// (as [`Dataset::gather`](crate::data::Dataset::gather) produces them); a shorter slice
    /// counts only its whole images. Leaves `rows` empty for an MLP or a CNN.
    pub fn touched_rows(&self, images: &[f32], batch: usize, rows: &mut Vec<u64>) {
        match self.stages.first().map(|stage| &stage.layer) {
            Some(Layer::EmbeddingBag(bag)) => bag.touched_rows(images, batch, rows),
            _ => rows.clear(),
        }
    }

    /// Shapes a `[batch, height * width]` batch as the first stage expects it.
    fn stage_input(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = self.parameters.dtype();
        match self.stages.first().map(|stage| &stage.layer) {
            Some(Layer::Convolution(_)) => {
                let (height, width) = self.image_shape;
                images
                    .to_dtype(dtype)?
                    .reshape((images.dim(0)?, 1, height, width))
            }
            // The bag reads the pixels' exact intensities: it takes f32 and casts its own output.
            Some(Layer::EmbeddingBag(_)) => Ok(images.clone()),
            _ => images.to_dtype(dtype),
        }
    }

    /// Runs the forward pass cut into stages (see [`StagedForward`]); the logits equal those of
    /// [`Module::forward`].
    pub fn forward_staged(&self, images: &Tensor) -> Result<StagedForward> {
        let mut inputs = Vec::with_capacity(self.stages.len());
        let mut outputs: Vec<Tensor> = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let output = match outputs.last() {
                None => {
                    inputs.push(None);
                    stage.forward(&self.stage_input(images)?)?
                }
                Some(previous) => {
                    let input = Var::from_tensor(previous)?;
                    let output = stage.forward(input.as_tensor())?;
                    inputs.push(Some(input));
                    output
                }
            };
            outputs.push(output);
        }
        Ok(StagedForward { inputs, outputs })
    }

    /// Back-propagates `loss` (computed from `forward.logits()`) one stage at a time, last stage
    /// first, calling `on_stage` with each stage's parameter indices and the gradient store
    /// holding their gradients as soon as that stage is done.
    pub fn backward_staged(
        &self,
        forward: StagedForward,
        loss: &Tensor,
        mut on_stage: impl FnMut(Range<usize>, &GradStore) -> Result<()>,
    ) -> Result<()> {
        let StagedForward { inputs, outputs } = forward;
        let mut output_gradient: Option<Tensor> = None;
        for (index, stage) in self.stages.iter().enumerate().rev() {
            let gradients = match output_gradient.take() {
                None => loss.backward()?,
                Some(gradient) => outputs[index]
                    .apply_op1(SeedGradient { gradient })?
                    .backward()?,
            };
            on_stage(stage.parameters.clone(), &gradients)?;
            if let Some(input) = &inputs[index] {
                let gradient = gradients.get(input.as_tensor()).ok_or_else(|| {
                    TrainerError::Config(format!("stage {index} input has no gradient"))
                })?;
                // Detached: a stored gradient still records how it was computed, and walking
                // that graph again in the next stage would differentiate the backward pass.
                output_gradient = Some(gradient.detach());
            }
        }
        Ok(())
    }
}

/// A scalar whose gradient with respect to its argument is a given tensor: back-propagating it
/// through a stage computes the stage's vector-Jacobian product with that tensor, the gradient
/// the following stages sent back. Its value is 0 and never used.
pub(crate) struct SeedGradient {
    /// Gradient of the loss with respect to the stage's output.
    pub(crate) gradient: Tensor,
}

impl CustomOp1 for SeedGradient {
    fn name(&self) -> &'static str {
        "cohort-seed-gradient"
    }

    fn cpu_fwd(
        &self,
        _storage: &CpuStorage,
        _layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    /// The same zero on the argument's GPU. Written against candle's backend traits, so it
    /// builds with and without candle's CUDA kernels (without them no CUDA storage exists and
    /// this is never called).
    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        _layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let scalar = Shape::from(());
        let zero = storage.device().zeros_impl(&scalar, DType::F32)?;
        Ok((zero, scalar))
    }

    fn bwd(
        &self,
        _argument: &Tensor,
        _result: &Tensor,
        _result_gradient: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.gradient.clone()))
    }
}

impl Module for Model {
    /// Maps a `[batch, height * width]` batch of normalised images to `[batch, classes]` logits.
    fn forward(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let mut activations = self.stage_input(images)?;
        for stage in &self.stages {
            activations = stage.forward(&activations)?;
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
            ..ModelSpec::default()
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
    fn zero_widths_are_errors() {
        let spec = ModelSpec {
            hidden: vec![4, 0],
            ..ModelSpec::default()
        };
        assert!(Model::new(&spec, (4, 4), 10, &Device::Cpu).is_err());
        assert!(Model::new(&ModelSpec::default(), (4, 4), 0, &Device::Cpu).is_err());
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

    #[test]
    fn staged_backward_gives_the_gradients_of_the_whole_graph() {
        for spec in [
            ModelSpec {
                hidden: vec![7, 5],
                ..ModelSpec::default()
            },
            ModelSpec {
                kind: ModelKind::Cnn,
                hidden: vec![6],
                channels: Some(vec![3, 4]),
                seed: 1,
                ..ModelSpec::default()
            },
            ModelSpec {
                kind: ModelKind::Embedding,
                hidden: vec![6],
                embedding_width: Some(5),
                intensity_levels: Some(4),
                seed: 2,
                ..ModelSpec::default()
            },
        ] {
            let model = Model::new(&spec, (8, 8), 3, &Device::Cpu).unwrap();
            let splits = crate::data::synthetic_splits(10, 1, 8, 3, 4).unwrap();
            let indices: Vec<usize> = (0..10).collect();
            let (mut images, mut labels) = (Vec::new(), Vec::new());
            splits
                .train
                .gather(&indices, &mut images, &mut labels)
                .unwrap();
            let images = Tensor::from_slice(&images, (10, 64), &Device::Cpu).unwrap();
            let labels = Tensor::from_slice(&labels, 10, &Device::Cpu).unwrap();
            let count = model.parameters().element_count();

            let logits = model.forward(&images).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
            let mut whole = vec![0.0; count];
            model
                .parameters()
                .read_gradients(&loss.backward().unwrap(), &mut whole, 1.0)
                .unwrap();

            let staged = model.forward_staged(&images).unwrap();
            let staged_logits = staged.logits().to_vec2::<f32>().unwrap();
            assert_eq!(staged_logits, logits.to_vec2::<f32>().unwrap());
            let loss = candle_nn::loss::cross_entropy(staged.logits(), &labels).unwrap();
            let mut by_stage = vec![f32::NAN; count];
            let mut order = Vec::new();
            model
                .backward_staged(staged, &loss, |parameters, gradients| {
                    order.push(parameters.start);
                    for index in parameters {
                        let parameter = model.parameters().iter().nth(index).unwrap();
                        let gradient = gradients.get(parameter.tensor()).unwrap();
                        let values = gradient.flatten_all()?.to_vec1::<f32>()?;
                        by_stage[parameter.flat_range()].copy_from_slice(&values);
                    }
                    Ok(())
                })
                .unwrap();
            assert!(order.windows(2).all(|pair| pair[0] > pair[1]), "{order:?}");
            for (a, b) in whole.iter().zip(&by_stage) {
                assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{a} vs {b}");
            }
            assert!(whole.iter().any(|&g| g != 0.0), "{:?}", spec.kind);
        }
    }

    fn embedding_spec(hidden: Vec<u32>, width: u32, levels: u32) -> ModelSpec {
        ModelSpec {
            kind: ModelKind::Embedding,
            hidden,
            embedding_width: Some(width),
            intensity_levels: Some(levels),
            seed: 7,
            ..ModelSpec::default()
        }
    }

    /// Random sparse images (about half the pixels background) of `pixels` grey values, the
    /// last one blank, with labels below `classes`; returns the grey values, the normalised
    /// images and the labels.
    fn sparse_images(
        count: usize,
        pixels: usize,
        classes: usize,
        seed: u64,
    ) -> (Vec<u8>, Vec<f32>, Vec<u32>) {
        use rand::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut greys: Vec<u8> = (0..count * pixels)
            .map(|_| {
                if rng.random_bool(0.5) {
                    0
                } else {
                    rng.random()
                }
            })
            .collect();
        greys[(count - 1) * pixels..].fill(0);
        let labels: Vec<u8> = (0..count)
            .map(|_| rng.random_range(0..classes as u8))
            .collect();
        let dataset = crate::data::Dataset::new(greys.clone(), labels, 1, pixels, classes).unwrap();
        let indices: Vec<usize> = (0..count).collect();
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        dataset.gather(&indices, &mut images, &mut labels).unwrap();
        (greys, images, labels)
    }

    /// Returns the tokens of one image from its grey values, in exact integer arithmetic.
    fn reference_tokens(greys: &[u8], levels: u32) -> Vec<usize> {
        greys
            .iter()
            .enumerate()
            .filter_map(|(pixel, &grey)| {
                let level = (u32::from(grey) * levels / 255).min(levels - 1) as usize;
                (level > 0).then(|| pixel * (levels as usize - 1) + level - 1)
            })
            .collect()
    }

    #[test]
    fn embedding_shapes_and_parameter_count_match_the_spec() {
        let spec = ModelSpec {
            kind: ModelKind::Embedding,
            hidden: vec![64, 16],
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
                "embedding.table",
                "dense.0.weight",
                "dense.0.bias",
                "dense.1.weight",
                "dense.1.bias",
                "dense.2.weight",
                "dense.2.bias"
            ]
        );
        let table = model.embedding_table().unwrap();
        assert_eq!(
            table,
            EmbeddingTable {
                parameter_index: 0,
                rows: 784 * 7,
                width: 32
            }
        );
        let parameter = model
            .parameters()
            .iter()
            .nth(table.parameter_index)
            .unwrap();
        assert_eq!(parameter.shape().dims(), &[784 * 7, 32]);
        let images = Tensor::ones((5, 784), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.forward(&images).unwrap().dims(), &[5, 10]);
        let images = Tensor::zeros((0, 784), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(model.forward(&images).unwrap().dims(), &[0, 10]);
    }

    #[test]
    fn only_the_embedding_model_has_a_table_and_touched_rows() {
        let images = vec![1.0; 2 * 784];
        let mut rows = vec![1, 2];
        for spec in [
            ModelSpec::default(),
            ModelSpec {
                kind: ModelKind::Cnn,
                ..ModelSpec::default()
            },
        ] {
            let model = Model::new(&spec, (28, 28), 10, &Device::Cpu).unwrap();
            assert_eq!(model.embedding_table(), None);
            model.touched_rows(&images, 2, &mut rows);
            assert!(rows.is_empty());
        }
        let model = Model::new(&embedding_spec(vec![], 4, 8), (28, 28), 10, &Device::Cpu).unwrap();
        model.touched_rows(&images, 2, &mut rows);
        assert_eq!(rows.len(), 784);
    }

    #[test]
    fn embedding_levels_and_widths_outside_the_spec_are_errors() {
        for (width, levels) in [(0, 8), (MAX_EMBEDDING_WIDTH + 1, 8), (8, 1), (8, 257)] {
            let spec = embedding_spec(vec![4], width, levels);
            assert!(Model::new(&spec, (4, 4), 10, &Device::Cpu).is_err());
        }
        let spec = embedding_spec(vec![4], 1, MAX_INTENSITY_LEVELS);
        assert!(Model::new(&spec, (4, 4), 10, &Device::Cpu).is_ok());
    }

    #[test]
    fn embedding_forward_matches_a_naive_reference() {
        let (pixels, width, hidden, classes, levels) = (36, 6, 5, 4, 5);
        let spec = embedding_spec(vec![hidden as u32], width as u32, levels);
        let model = Model::new(&spec, (6, 6), classes, &Device::Cpu).unwrap();
        let mut flat = vec![0.0; model.parameters().element_count()];
        model.parameters().read_values(&mut flat).unwrap();
        // Biases start at zero: give them values so that the reference checks them too.
        let (table, rest) = flat.split_at(pixels * (levels as usize - 1) * width);
        let (weight_0, rest) = rest.split_at(hidden * width);
        let bias_0: Vec<f32> = (0..hidden).map(|i| 0.1 * i as f32 - 0.2).collect();
        let (weight_1, _) = rest[hidden..].split_at(classes * hidden);
        let bias_1: Vec<f32> = (0..classes).map(|o| 0.3 - 0.2 * o as f32).collect();
        let flat: Vec<f32> = [table, weight_0, &bias_0, weight_1, &bias_1].concat();
        model.parameters().write_values(&flat).unwrap();

        let count = 7;
        let (greys, images, _) = sparse_images(count, pixels, classes, 3);
        let input = Tensor::from_slice(&images, (count, pixels), &Device::Cpu).unwrap();
        let logits = model.forward(&input).unwrap().to_vec2::<f32>().unwrap();
        for (image, got) in logits.iter().enumerate() {
            let tokens = reference_tokens(&greys[image * pixels..(image + 1) * pixels], levels);
            assert_eq!(tokens.is_empty(), image + 1 == count);
            let mut mean = vec![0.0f32; width];
            for &token in &tokens {
                for (m, t) in mean
                    .iter_mut()
                    .zip(&table[token * width..(token + 1) * width])
                {
                    *m += t / tokens.len() as f32;
                }
            }
            let activations: Vec<f32> = (0..hidden)
                .map(|i| {
                    let row = &weight_0[i * width..(i + 1) * width];
                    let sum: f32 = row.iter().zip(&mean).map(|(w, x)| w * x).sum();
                    (sum + bias_0[i]).max(0.0)
                })
                .collect();
            for (o, got) in got.iter().enumerate() {
                let row = &weight_1[o * hidden..(o + 1) * hidden];
                let sum: f32 = row.iter().zip(&activations).map(|(w, x)| w * x).sum();
                let want = sum + bias_1[o];
                assert!((got - want).abs() < 1e-5, "image {image}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn embedding_table_gradient_is_zero_outside_the_touched_rows() {
        let (pixels, width, classes, levels) = (64, 8, 3, 8);
        let spec = embedding_spec(vec![16], width as u32, levels);
        let model = Model::new(&spec, (8, 8), classes, &Device::Cpu).unwrap();
        let count = 5;
        let (greys, images, labels) = sparse_images(count, pixels, classes, 9);
        let mut touched = Vec::new();
        model.touched_rows(&images, count, &mut touched);
        let expected: std::collections::BTreeSet<u64> = greys
            .chunks(pixels)
            .flat_map(|image| reference_tokens(image, levels))
            .map(|token| token as u64)
            .collect();
        assert_eq!(touched, expected.into_iter().collect::<Vec<_>>());
        let rows = model.embedding_table().unwrap().rows;
        assert!(
            touched.len() > 10 && touched.len() < rows / 2,
            "{touched:?}"
        );

        let input = Tensor::from_slice(&images, (count, pixels), &Device::Cpu).unwrap();
        let labels = Tensor::from_slice(&labels, count, &Device::Cpu).unwrap();
        let loss =
            candle_nn::loss::cross_entropy(&model.forward(&input).unwrap(), &labels).unwrap();
        let mut gradient = vec![f32::NAN; rows * width];
        model
            .parameters()
            .read_gradient(0, &loss.backward().unwrap(), &mut gradient, 1.0)
            .unwrap();
        for (row, values) in gradient.chunks(width).enumerate() {
            let nonzero = values.iter().any(|&g| g != 0.0);
            assert_eq!(
                nonzero,
                touched.binary_search(&(row as u64)).is_ok(),
                "row {row}: {values:?}"
            );
        }
    }
}
