//! A GPT-style decoder-only transformer that can be cut into pipeline stages and split
//! Megatron-style over tensor-parallel ranks.
//!
//! The model is pre-LayerNorm with GELU (candle's tanh approximation, GPT-2's) and no dropout:
//! token and learned position embeddings, `layers` blocks of `x + attention(ln1(x))` then
//! `x + mlp(ln2(x))`, a final LayerNorm `ln_f` and a linear head over the vocabulary (optionally
//! tied to the token embedding). A [`TransformerStage`] holds the blocks of one pipeline stage
//! (plus the embeddings on the first stage and `ln_f` and the head on the last), with the
//! attention and MLP weights split over the ranks of its tensor-parallel group.
//!
//! Parameters have global, layout-independent names (the checkpoint keys): `embedding.token`,
//! `embedding.position`, `blocks.{i}.ln1.weight`, `blocks.{i}.attention.{q,k,v,output}.weight`
//! and `.bias`, `blocks.{i}.ln2.weight`, `blocks.{i}.mlp.{up,down}.weight` and `.bias`,
//! `ln_f.weight`, `head.weight` (absent when tied) and `head.bias`. Their initial values come
//! from [`initialization`], seeded by name, so every cut of the model starts from the same
//! numbers.
//!
//! - [`tensor_parallel`]: [`TensorParallel`] (the group, Megatron's `f` and `g` operators and
//!   gathering of slices), [`Split`] and [`ParameterLayout`].
//! - [`initialization`]: the name-seeded initial values.
//! - `block`: one block's forward pass on one tensor-parallel rank (LayerNorm, causal
//!   attention over `[batch, heads, sequence, head_dimension]`, the MLP).

mod block;
pub mod initialization;
pub mod tensor_parallel;

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use cohort_jobspec::layout::TransformerShape;

use block::{Block, LayerNorm, linear};
pub use initialization::TensorInitialization;
pub use tensor_parallel::{ParameterLayout, Split, TensorParallel};

use crate::error::{Result, TrainerError};
use crate::parameters::ParameterSet;

/// Epsilon added to the variance in every LayerNorm.
pub const LAYER_NORM_EPSILON: f64 = 1e-5;

/// Standard deviation of the initial weights and embeddings (GPT-2's). The projections that
/// write into the residual stream (`attention.output` and `mlp.down`) are further scaled by
/// `1 / sqrt(2 * layers)`, as in GPT-2.
pub const INITIAL_STANDARD_DEVIATION: f32 = 0.02;

/// What defines a transformer's parameters: the vocabulary, the shape and the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    /// Number of token symbols (from the data: about 65 for character-level text).
    pub vocabulary: usize,
    /// Layers, heads, width, context and tying, with defaults applied.
    pub shape: TransformerShape,
    /// Seed of every initial value (see [`initialization`]).
    pub seed: u64,
}

impl TransformerConfig {
    /// Reports every problem of the config for a tensor-parallel group of `tensor_size` ranks.
    fn validate(&self, tensor_size: usize) -> Result<()> {
        let shape = &self.shape;
        let mut problems = Vec::new();
        if self.vocabulary == 0 {
            problems.push("vocabulary = 0, expected >= 1".to_owned());
        }
        for (field, value) in [
            ("layers", shape.layers),
            ("heads", shape.heads),
            ("width", shape.width),
            ("context", shape.context),
        ] {
            if value == 0 {
                problems.push(format!("shape.{field} = 0, expected >= 1"));
            }
        }
        if shape.heads > 0 && !shape.width.is_multiple_of(shape.heads) {
            problems.push(format!(
                "shape.width = {} is not a multiple of shape.heads = {}",
                shape.width, shape.heads
            ));
        }
        if shape.heads > 0 && !(shape.heads as usize).is_multiple_of(tensor_size) {
            problems.push(format!(
                "shape.heads = {} is not a multiple of the tensor-parallel size {tensor_size}",
                shape.heads
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TrainerError::Config(format!(
                "transformer: {}",
                problems.join("; ")
            )))
        }
    }
}

/// Which part of the model one rank holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePlan {
    /// The blocks of the stage, by global index.
    pub blocks: Range<usize>,
    /// Whether the stage is the first: it holds the embeddings and takes tokens.
    pub first: bool,
    /// Whether the stage is the last: it holds `ln_f` and the head and returns logits.
    pub last: bool,
}

impl StagePlan {
    /// Returns the plan of the whole model on one stage.
    pub fn full(layers: usize) -> Self {
        Self {
            blocks: 0..layers,
            first: true,
            last: true,
        }
    }

    /// Returns the plan of stage `stage` when the stages hold `stage_layers` consecutive blocks
    /// each (as [`cohort_jobspec::layout::balanced_stage_layers`] returns them).
    pub fn from_stage_layers(stage_layers: &[u32], stage: usize) -> Result<Self> {
        if stage >= stage_layers.len() {
            return Err(TrainerError::Config(format!(
                "pipeline stage {stage} of {} stages, expected a stage below {}",
                stage_layers.len(),
                stage_layers.len()
            )));
        }
        let start: usize = stage_layers[..stage].iter().map(|&n| n as usize).sum();
        Ok(Self {
            blocks: start..start + stage_layers[stage] as usize,
            first: stage == 0,
            last: stage + 1 == stage_layers.len(),
        })
    }
}

/// The input of a stage's forward pass.
#[derive(Debug, Clone, Copy)]
pub enum StageInput<'a> {
    /// Token ids, `u32 [batch, sequence]`: the first stage's input.
    Tokens(&'a Tensor),
    /// The previous stage's output, `f32 [batch, sequence, width]`.
    Activations(&'a Tensor),
}

/// The first stage's embedding tables.
struct Embeddings {
    /// Token embedding, `[vocabulary, width]`.
    token: Tensor,
    /// Position embedding, `[context, width]`.
    position: Tensor,
}

/// The last stage's final LayerNorm and head.
struct Head {
    /// Final LayerNorm.
    ln_f: LayerNorm,
    /// Head weight `[vocabulary, width]`: the token embedding when tied.
    weight: Tensor,
    /// Head bias `[vocabulary]`.
    bias: Tensor,
}

/// Creates the parameters of a stage in order, each initialised from its full tensor.
struct ParameterBuilder<'a> {
    /// The model seed.
    seed: u64,
    /// Rank and size of the tensor-parallel group.
    tensor_parallel: &'a TensorParallel,
    /// The parameters created so far.
    parameters: ParameterSet,
    /// Their layouts, in the same order.
    layouts: Vec<ParameterLayout>,
}

impl ParameterBuilder<'_> {
    /// The first stage's token and position tables.
    fn embeddings(
        &mut self,
        token_shape: [usize; 2],
        context: usize,
        normal: TensorInitialization,
    ) -> Result<Embeddings> {
        Ok(Embeddings {
            token: self.add(
                "embedding.token".to_owned(),
                &token_shape,
                Split::Replicated,
                normal,
            )?,
            position: self.add(
                "embedding.position".to_owned(),
                &[context, token_shape[1]],
                Split::Replicated,
                normal,
            )?,
        })
    }

    /// Block `index`: attention with `heads` heads and the MLP, split Megatron's way.
    fn block(
        &mut self,
        index: usize,
        width: usize,
        heads: usize,
        residual_deviation: f32,
    ) -> Result<Block> {
        let prefix = format!("blocks.{index}");
        let square = [width, width];
        let ln1 = self.layer_norm(&format!("{prefix}.ln1"), width)?;
        let attention = format!("{prefix}.attention");
        let mut projection = |name: &str| {
            self.linear(
                &format!("{attention}.{name}"),
                square,
                Split::Rows,
                INITIAL_STANDARD_DEVIATION,
            )
        };
        let query = projection("q")?;
        let key = projection("k")?;
        let value = projection("v")?;
        let (output_weight, output_bias) = self.linear(
            &format!("{attention}.output"),
            square,
            Split::Columns,
            residual_deviation,
        )?;
        let ln2 = self.layer_norm(&format!("{prefix}.ln2"), width)?;
        let up = self.linear(
            &format!("{prefix}.mlp.up"),
            [4 * width, width],
            Split::Rows,
            INITIAL_STANDARD_DEVIATION,
        )?;
        let (down_weight, down_bias) = self.linear(
            &format!("{prefix}.mlp.down"),
            [width, 4 * width],
            Split::Columns,
            residual_deviation,
        )?;
        Ok(Block {
            ln1,
            query,
            key,
            value,
            output_weight,
            output_bias,
            ln2,
            up,
            down_weight,
            down_bias,
            local_heads: heads / self.tensor_parallel.size(),
            head_dimension: width / heads,
        })
    }

    /// The last stage's final norm and output layer, tied to `token` (this stage's token
    /// table, if it has one) when `tie` says so.
    fn head(
        &mut self,
        token_shape: [usize; 2],
        tie: bool,
        token: Option<Tensor>,
        normal: TensorInitialization,
    ) -> Result<Head> {
        let ln_f = self.layer_norm("ln_f", token_shape[1])?;
        let weight = match (tie, token) {
            (true, Some(token)) => token,
            (true, None) => self.add(
                "embedding.token".to_owned(),
                &token_shape,
                Split::Replicated,
                normal,
            )?,
            (false, _) => self.add(
                "head.weight".to_owned(),
                &token_shape,
                Split::Replicated,
                normal,
            )?,
        };
        let bias = self.add(
            "head.bias".to_owned(),
            &[token_shape[0]],
            Split::Replicated,
            TensorInitialization::Zeros,
        )?;
        Ok(Head { ln_f, weight, bias })
    }

    fn add(
        &mut self,
        name: String,
        full_shape: &[usize],
        split: Split,
        initialization: TensorInitialization,
    ) -> Result<Tensor> {
        let layout = ParameterLayout {
            name,
            full_shape: full_shape.to_vec(),
            split,
        };
        let count = full_shape.iter().product();
        let full = initialization::full_values(self.seed, &layout.name, count, initialization);
        let (rank, size) = (self.tensor_parallel.rank(), self.tensor_parallel.size());
        let local = layout.slice(&full, rank, size)?;
        // Created from its values rather than updated in place, so a stage builds on any device.
        let tensor =
            self.parameters
                .add_values(layout.name.clone(), layout.local_shape(size)?, local)?;
        self.layouts.push(layout);
        Ok(tensor)
    }

    fn layer_norm(&mut self, name: &str, width: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.add(
                format!("{name}.weight"),
                &[width],
                Split::Replicated,
                TensorInitialization::Ones,
            )?,
            bias: self.add(
                format!("{name}.bias"),
                &[width],
                Split::Replicated,
                TensorInitialization::Zeros,
            )?,
        })
    }

    /// Adds `{name}.weight` (`[out, in]`, split by `split`) and `{name}.bias` (`[out]`, split
    /// by rows only when the weight is).
    fn linear(
        &mut self,
        name: &str,
        shape: [usize; 2],
        split: Split,
        standard_deviation: f32,
    ) -> Result<(Tensor, Tensor)> {
        let weight = self.add(
            format!("{name}.weight"),
            &shape,
            split,
            TensorInitialization::Normal { standard_deviation },
        )?;
        let bias_split = if split == Split::Rows {
            Split::Rows
        } else {
            Split::Replicated
        };
        let bias = self.add(
            format!("{name}.bias"),
            &shape[..1],
            bias_split,
            TensorInitialization::Zeros,
        )?;
        Ok((weight, bias))
    }
}

/// The part of the transformer one rank holds: some consecutive blocks, the embeddings on the
/// first stage, `ln_f` and the head on the last, with attention and MLP weights split over the
/// tensor-parallel group.
///
/// The last stage of a tied model that is not also the first holds its own copy of
/// `embedding.token` (initialised identically, [`Split::Replicated`]); the training loop must
/// sum that parameter's gradient between the first and the last stage to keep the copies equal,
/// as Megatron does.
pub struct TransformerStage {
    /// Vocabulary, shape and seed.
    config: TransformerConfig,
    /// Which part of the model this is.
    plan: StagePlan,
    /// The tensor-parallel group the blocks are split over.
    tensor_parallel: Arc<TensorParallel>,
    /// Local parameters, in creation order.
    parameters: ParameterSet,
    /// One layout per local parameter, same order.
    layouts: Vec<ParameterLayout>,
    /// Embeddings, on the first stage.
    embeddings: Option<Embeddings>,
    /// The stage's blocks, in order.
    blocks: Vec<Block>,
    /// Final LayerNorm and head, on the last stage.
    head: Option<Head>,
    /// Additive causal mask `[context, context]`: 0 on and below the diagonal, -inf above.
    mask: Tensor,
    /// Element type of the matrix products (f32, or bf16/f16 for mixed precision); the
    /// parameters stay f32 masters, cast on use.
    compute_dtype: DType,
}

/// The additive causal mask of `context` positions: -inf above the diagonal.
fn causal_mask(context: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..context * context)
        .map(|i| {
            if i % context > i / context {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(mask, (context, context), device)?)
}

impl TransformerStage {
    /// Builds the part of the model `plan` names, split over `tensor_parallel`, with its
    /// name-seeded initial values: every local value equals the single-rank model's value at
    /// the same position.
    pub fn new(
        config: &TransformerConfig,
        plan: StagePlan,
        tensor_parallel: Arc<TensorParallel>,
        device: &Device,
    ) -> Result<Self> {
        config.validate(tensor_parallel.size())?;
        let shape = config.shape;
        let layers = shape.layers as usize;
        if plan.blocks.start > plan.blocks.end
            || plan.blocks.end > layers
            || (plan.first && plan.blocks.start != 0)
            || (plan.last && plan.blocks.end != layers)
        {
            return Err(TrainerError::Config(format!(
                "transformer stage of blocks {:?} (first {}, last {}), expected blocks within \
                 0..{layers}, starting at 0 on the first stage and ending at {layers} on the last",
                plan.blocks, plan.first, plan.last
            )));
        }
        let (width, context, vocabulary) = (
            shape.width as usize,
            shape.context as usize,
            config.vocabulary,
        );
        let heads = shape.heads as usize;
        let normal = TensorInitialization::Normal {
            standard_deviation: INITIAL_STANDARD_DEVIATION,
        };
        let residual_deviation = INITIAL_STANDARD_DEVIATION / ((2 * layers) as f32).sqrt();
        let mut builder = ParameterBuilder {
            seed: config.seed,
            tensor_parallel: &tensor_parallel,
            parameters: ParameterSet::new(device.clone()),
            layouts: Vec::new(),
        };
        let token_shape = [vocabulary, width];
        let embeddings = if plan.first {
            Some(builder.embeddings(token_shape, context, normal)?)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(plan.blocks.len());
        for index in plan.blocks.clone() {
            blocks.push(builder.block(index, width, heads, residual_deviation)?);
        }
        let head = if plan.last {
            let token = embeddings.as_ref().map(|e| e.token.clone());
            Some(builder.head(token_shape, shape.tie_embeddings, token, normal)?)
        } else {
            None
        };
        let mask = causal_mask(context, device)?;
        let ParameterBuilder {
            parameters,
            layouts,
            ..
        } = builder;
        Ok(Self {
            config: config.clone(),
            plan,
            tensor_parallel,
            parameters,
            layouts,
            embeddings,
            blocks,
            head,
            mask,
            compute_dtype: DType::F32,
        })
    }

    /// Builds the whole model on a single rank (all blocks, first and last, no tensor
    /// parallelism), e.g. for sampling or as a reference.
    pub fn full(config: &TransformerConfig, device: &Device) -> Result<Self> {
        Self::new(
            config,
            StagePlan::full(config.shape.layers as usize),
            Arc::new(TensorParallel::single()),
            device,
        )
    }

    /// Returns the local parameters, in a fixed order (embeddings, blocks, `ln_f`, head).
    pub fn parameters(&self) -> &ParameterSet {
        &self.parameters
    }

    /// Returns one layout per local parameter, in the order of [`Self::parameters`].
    pub fn layouts(&self) -> &[ParameterLayout] {
        &self.layouts
    }

    /// Returns which part of the model the stage holds.
    pub fn plan(&self) -> &StagePlan {
        &self.plan
    }

    /// Returns the tensor-parallel group the stage is split over.
    pub fn tensor_parallel(&self) -> &Arc<TensorParallel> {
        &self.tensor_parallel
    }

    /// Runs the stage: tokens `u32 [batch, sequence]` on the first stage, the previous stage's
    /// activations `[batch, sequence, width]` on the others; returns `[batch, sequence, width]`
    /// activations, or `[batch, sequence, vocabulary]` logits on the last stage. The sequence
    /// may be shorter than the context. Every rank of the tensor-parallel group must call it
    /// with the same input.
    pub fn forward(&self, input: StageInput<'_>) -> Result<Tensor> {
        let mut x = match (input, &self.embeddings) {
            (StageInput::Tokens(tokens), Some(embeddings)) => self.embed(embeddings, tokens)?,
            (StageInput::Activations(activations), None) => {
                self.check_activations(activations)?;
                activations.clone()
            }
            (StageInput::Tokens(_), None) => {
                return Err(TrainerError::Config(format!(
                    "transformer stage of blocks {:?} got tokens, expected activations (only \
                     the first stage embeds tokens)",
                    self.plan.blocks
                )));
            }
            (StageInput::Activations(_), Some(_)) => {
                return Err(TrainerError::Config(
                    "first transformer stage got activations, expected tokens".to_owned(),
                ));
            }
        };
        for block in &self.blocks {
            x = block
                .forward(&x, &self.tensor_parallel, &self.mask, self.compute_dtype)
                .map_err(|error| match error {
                    TrainerError::Tensor(error) => self.tensor_parallel.trainer_error(error),
                    other => other,
                })?;
        }
        let Some(head) = &self.head else {
            return Ok(x);
        };
        let (batch, sequence, width) = x.dims3()?;
        let normed = head.ln_f.forward(&x)?.reshape((batch * sequence, width))?;
        let logits = linear(&normed, &head.weight, Some(&head.bias), self.compute_dtype)?;
        Ok(logits.reshape((batch, sequence, self.config.vocabulary))?)
    }

    /// Computes the matrix products in `dtype` from now on (bf16 or f16 for mixed precision;
    /// f32 by default). The parameters remain the f32 masters the optimizer updates.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
    }

    /// Element type of the matrix products.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Returns the mean cross-entropy of `logits` (`[batch, sequence, vocabulary]`) against
    /// `targets` (`u32 [batch, sequence]`) over all tokens.
    pub fn loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (batch, sequence, vocabulary) = logits.dims3()?;
        if targets.dims() != [batch, sequence] {
            return Err(TrainerError::Config(format!(
                "targets of shape {:?}, expected [{batch}, {sequence}] like the logits",
                targets.dims()
            )));
        }
        Ok(candle_nn::loss::cross_entropy(
            &logits.reshape((batch * sequence, vocabulary))?,
            &targets.flatten_all()?,
        )?)
    }

    /// Overwrites every local parameter with its slice of the full tensor `full(name)` returns
    /// (row-major, of the layout's full shape): restores a checkpoint of any mesh into this
    /// one.
    pub fn load_full(&self, full: &dyn Fn(&str) -> Option<Vec<f32>>) -> Result<()> {
        let (rank, size) = (self.tensor_parallel.rank(), self.tensor_parallel.size());
        for (index, layout) in self.layouts.iter().enumerate() {
            let values = full(&layout.name).ok_or_else(|| {
                TrainerError::Config(format!("parameter {} missing from the source", layout.name))
            })?;
            let local = layout.slice(&values, rank, size)?;
            self.parameters
                .update(index, |values| values.copy_from_slice(&local))?;
        }
        Ok(())
    }

    /// Returns the embedded tokens `[batch, sequence, width]`, after checking their shape and
    /// range.
    fn embed(&self, embeddings: &Embeddings, tokens: &Tensor) -> Result<Tensor> {
        let (batch, sequence) = tokens.dims2()?;
        let context = self.config.shape.context as usize;
        if tokens.dtype() != DType::U32 || sequence == 0 || sequence > context {
            return Err(TrainerError::Config(format!(
                "tokens of {:?} with shape {:?}, expected u32 [batch, 1..={context}]",
                tokens.dtype(),
                tokens.dims()
            )));
        }
        let ids = tokens.flatten_all()?;
        if batch > 0 {
            let largest = ids.max(0)?.to_scalar::<u32>()?;
            if largest as usize >= self.config.vocabulary {
                return Err(TrainerError::Config(format!(
                    "token {largest}, expected tokens below the vocabulary of {}",
                    self.config.vocabulary
                )));
            }
        }
        let width = self.config.shape.width as usize;
        let token = embeddings
            .token
            .embedding(&ids)?
            .reshape((batch, sequence, width))?;
        Ok(token.broadcast_add(&embeddings.position.narrow(0, 0, sequence)?)?)
    }

    fn check_activations(&self, activations: &Tensor) -> Result<()> {
        if activations.dtype() != DType::F32 {
            return Err(TrainerError::Config(format!(
                "activations of {:?}, expected f32",
                activations.dtype()
            )));
        }
        let context = self.config.shape.context as usize;
        let width = self.config.shape.width as usize;
        match activations.dims() {
            &[_, sequence, found] if found == width && (1..=context).contains(&sequence) => Ok(()),
            dims => Err(TrainerError::Config(format!(
                "activations of shape {dims:?}, expected [batch, 1..={context}, {width}]"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use cohort_collective::{BufferMut, BufferRef, Communicator, ReduceOp};

    use super::*;

    /// A communicator that only knows its rank and size: building a stage does not
    /// communicate, so it suffices to look at the shards of any rank.
    struct Offline {
        /// This rank.
        rank: usize,
        /// Ranks in the group.
        size: usize,
    }

    impl Communicator for Offline {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.size
        }
        fn all_reduce(&mut self, _: BufferMut<'_>, _: ReduceOp) -> cohort_collective::Result<()> {
            unreachable!("building a stage does not communicate")
        }
        fn broadcast(&mut self, _: BufferMut<'_>, _: usize) -> cohort_collective::Result<()> {
            unreachable!("building a stage does not communicate")
        }
        fn all_gather(
            &mut self,
            _: BufferRef<'_>,
            _: BufferMut<'_>,
        ) -> cohort_collective::Result<()> {
            unreachable!("building a stage does not communicate")
        }
        fn reduce_scatter(
            &mut self,
            _: BufferRef<'_>,
            _: BufferMut<'_>,
            _: ReduceOp,
        ) -> cohort_collective::Result<()> {
            unreachable!("building a stage does not communicate")
        }
        fn barrier(&mut self) -> cohort_collective::Result<()> {
            unreachable!("building a stage does not communicate")
        }
    }

    fn config() -> TransformerConfig {
        TransformerConfig {
            vocabulary: 7,
            shape: TransformerShape {
                layers: 3,
                heads: 4,
                width: 8,
                context: 5,
                tie_embeddings: false,
            },
            seed: 5,
        }
    }

    /// Returns the local values of `stage` by name, with their layouts.
    fn values(stage: &TransformerStage) -> Vec<(ParameterLayout, Vec<f32>)> {
        let parameters = stage.parameters();
        let mut flat = vec![0.0; parameters.element_count()];
        parameters.read_values(&mut flat).unwrap();
        parameters
            .iter()
            .zip(stage.layouts())
            .map(|(parameter, layout)| {
                assert_eq!(parameter.name(), layout.name);
                (layout.clone(), flat[parameter.flat_range()].to_vec())
            })
            .collect()
    }

    #[test]
    fn every_shard_and_stage_holds_the_single_rank_values() {
        let config = config();
        let full = TransformerStage::full(&config, &Device::Cpu).unwrap();
        let full_values: std::collections::HashMap<_, _> = values(&full)
            .into_iter()
            .map(|(layout, values)| (layout.name, values))
            .collect();
        assert_eq!(
            full.parameters().element_count() as u64,
            config.shape.parameter_count(config.vocabulary as u64)
        );
        for (size, plan) in [
            (2, StagePlan::full(3)),
            (4, StagePlan::from_stage_layers(&[1, 2], 1).unwrap()),
            (1, StagePlan::from_stage_layers(&[2, 1], 0).unwrap()),
        ] {
            for rank in 0..size {
                let tensor_parallel = Arc::new(if size == 1 {
                    TensorParallel::single()
                } else {
                    TensorParallel::new(Box::new(Offline { rank, size }))
                });
                let stage =
                    TransformerStage::new(&config, plan.clone(), tensor_parallel, &Device::Cpu)
                        .unwrap();
                for (layout, local) in values(&stage) {
                    let full = &full_values[&layout.name];
                    assert_eq!(local, layout.slice(full, rank, size).unwrap(), "{layout:?}");
                }
            }
        }
    }

    #[test]
    fn parameters_follow_the_global_names_and_megatron_splits() {
        let config = config();
        let tensor_parallel = Arc::new(TensorParallel::new(Box::new(Offline { rank: 1, size: 2 })));
        let stage = TransformerStage::new(
            &config,
            StagePlan::from_stage_layers(&[2, 1], 1).unwrap(),
            tensor_parallel,
            &Device::Cpu,
        )
        .unwrap();
        let described: Vec<_> = stage
            .layouts()
            .iter()
            .zip(stage.parameters().iter())
            .map(|(layout, parameter)| {
                (
                    layout.name.as_str(),
                    layout.split,
                    parameter.shape().dims().to_vec(),
                )
            })
            .collect();
        let expected = [
            ("blocks.2.ln1.weight", Split::Replicated, vec![8]),
            ("blocks.2.ln1.bias", Split::Replicated, vec![8]),
            ("blocks.2.attention.q.weight", Split::Rows, vec![4, 8]),
            ("blocks.2.attention.q.bias", Split::Rows, vec![4]),
            ("blocks.2.attention.k.weight", Split::Rows, vec![4, 8]),
            ("blocks.2.attention.k.bias", Split::Rows, vec![4]),
            ("blocks.2.attention.v.weight", Split::Rows, vec![4, 8]),
            ("blocks.2.attention.v.bias", Split::Rows, vec![4]),
            (
                "blocks.2.attention.output.weight",
                Split::Columns,
                vec![8, 4],
            ),
            ("blocks.2.attention.output.bias", Split::Replicated, vec![8]),
            ("blocks.2.ln2.weight", Split::Replicated, vec![8]),
            ("blocks.2.ln2.bias", Split::Replicated, vec![8]),
            ("blocks.2.mlp.up.weight", Split::Rows, vec![16, 8]),
            ("blocks.2.mlp.up.bias", Split::Rows, vec![16]),
            ("blocks.2.mlp.down.weight", Split::Columns, vec![8, 16]),
            ("blocks.2.mlp.down.bias", Split::Replicated, vec![8]),
            ("ln_f.weight", Split::Replicated, vec![8]),
            ("ln_f.bias", Split::Replicated, vec![8]),
            ("head.weight", Split::Replicated, vec![7, 8]),
            ("head.bias", Split::Replicated, vec![7]),
        ];
        assert_eq!(described.len(), expected.len());
        for (got, want) in described.iter().zip(expected) {
            assert_eq!((got.0, got.1, got.2.clone()), want);
        }
    }

    #[test]
    fn heads_must_divide_over_the_tensor_parallel_group() {
        let tensor_parallel = Arc::new(TensorParallel::new(Box::new(Offline { rank: 0, size: 3 })));
        let error =
            TransformerStage::new(&config(), StagePlan::full(3), tensor_parallel, &Device::Cpu)
                .err()
                .unwrap();
        assert!(error.to_string().contains("heads = 4"), "{error}");
        let mut config = config();
        config.vocabulary = 0;
        config.shape.width = 6;
        let message = TransformerStage::full(&config, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            message.contains("vocabulary = 0") && message.contains("width = 6"),
            "{message}"
        );
    }

    #[test]
    fn stage_plans_follow_the_stage_layers() {
        assert_eq!(
            StagePlan::from_stage_layers(&[2, 3, 1], 1).unwrap(),
            StagePlan {
                blocks: 2..5,
                first: false,
                last: false
            }
        );
        assert_eq!(
            StagePlan::from_stage_layers(&[4], 0).unwrap(),
            StagePlan::full(4)
        );
        assert!(StagePlan::from_stage_layers(&[1, 1], 2).is_err());
    }
}
