//! One rank's pipeline stage of the transformer: what the pipeline schedules call for each
//! micro-batch, with the saved graphs, the accumulated gradients and the losses.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};

use crate::error::{Result, TrainerError};
use crate::models::SeedGradient;
use crate::pipeline::PipelineStage;
use crate::transformer::{StageInput, TransformerStage};

/// What a micro-batch's backward pass needs.
struct Saved {
    /// The leaf holding the activation received from the previous stage.
    input: Option<Var>,
    /// The activation sent on, or the scaled loss on the last stage.
    output: Tensor,
}

/// Sums over evaluated micro-batches (last stage only).
#[derive(Debug, Default, Clone, Copy)]
pub struct EvaluationSums {
    /// Cross-entropy summed over tokens.
    pub loss: f64,
    /// Tokens whose next token was predicted right.
    pub correct: f64,
    /// Tokens evaluated.
    pub tokens: f64,
}

/// The transformer stage of one rank, driven by the pipeline schedules.
pub struct LanguageModelStage<'a> {
    /// The model part.
    model: &'a TransformerStage,
    /// Where tensors live.
    device: Device,
    /// Whether this stage holds the embeddings (reads tokens).
    first: bool,
    /// Whether it holds the head (computes the loss).
    last: bool,
    /// Input tokens of each micro-batch (first stage).
    inputs: Vec<Tensor>,
    /// Target tokens of each micro-batch (last stage).
    targets: Vec<Tensor>,
    /// Factor of each micro-batch loss in the step's loss: 1 / (replicas x micro-batches).
    loss_scale: f64,
    /// fp16 loss scaling: the backward pass starts from the loss times this (1 otherwise).
    gradient_scale: f64,
    /// Saved graphs by micro-batch.
    saved: HashMap<usize, Saved>,
    /// Accumulated gradients of the local parameters, flat.
    gradients: Vec<f32>,
    /// One micro-batch's gradients.
    scratch: Vec<f32>,
    /// This step's scaled loss (last stage).
    loss: f64,
    /// Evaluation sums.
    evaluation: EvaluationSums,
}

impl<'a> LanguageModelStage<'a> {
    /// Wraps `model`, which holds blocks of stage `first`..`last`.
    pub fn new(model: &'a TransformerStage, device: Device, first: bool, last: bool) -> Self {
        let count = model.parameters().element_count();
        Self {
            model,
            device,
            first,
            last,
            inputs: Vec::new(),
            targets: Vec::new(),
            loss_scale: 1.0,
            gradient_scale: 1.0,
            saved: HashMap::new(),
            gradients: vec![0.0; count],
            scratch: vec![0.0; count],
            loss: 0.0,
            evaluation: EvaluationSums::default(),
        }
    }

    /// Loads the next step's micro-batches (or an evaluation's): `inputs` and `targets` hold
    /// sequences of `context` tokens, cut into micro-batches of `micro_sequences` sequences
    /// (the last one may be shorter). Returns the number of micro-batches.
    pub fn load_batch(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        micro_sequences: usize,
        context: usize,
        loss_scale: f64,
    ) -> Result<usize> {
        let per_micro = micro_sequences.max(1) * context.max(1);
        let split = |tokens: &[u32]| -> Result<Vec<Tensor>> {
            tokens
                .chunks(per_micro)
                .map(|chunk| {
                    Ok(Tensor::from_slice(
                        chunk,
                        (chunk.len() / context.max(1), context),
                        &self.device,
                    )?)
                })
                .collect()
        };
        self.inputs = if self.first {
            split(inputs)?
        } else {
            Vec::new()
        };
        self.targets = if self.last {
            split(targets)?
        } else {
            Vec::new()
        };
        self.loss_scale = loss_scale;
        self.loss = 0.0;
        self.gradients.fill(0.0);
        Ok(inputs.len().div_ceil(per_micro))
    }

    /// Sets the factor the backward pass multiplies the loss by (fp16 loss scaling); the
    /// gradients come out multiplied by it.
    pub fn set_gradient_scale(&mut self, scale: f64) {
        self.gradient_scale = scale;
    }

    /// The accumulated gradients of this step.
    pub fn gradients(&self) -> &[f32] {
        &self.gradients
    }

    /// The accumulated gradients of this step, to average or clip.
    pub fn gradients_mut(&mut self) -> &mut [f32] {
        &mut self.gradients
    }

    /// This step's loss share (last stage; 0 elsewhere).
    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// Takes the evaluation sums gathered since the last call.
    pub fn take_evaluation(&mut self) -> EvaluationSums {
        std::mem::take(&mut self.evaluation)
    }

    /// Micro-batches whose graphs are held.
    pub fn live_activations(&self) -> usize {
        self.saved.len()
    }

    fn run(&self, micro: usize, input: Option<Tensor>) -> Result<(Option<Var>, Tensor)> {
        if self.first {
            let tokens = self.inputs.get(micro).ok_or_else(|| missing(micro))?;
            return Ok((None, self.model.forward(StageInput::Tokens(tokens))?));
        }
        let input = input.ok_or_else(|| {
            TrainerError::Config(format!(
                "micro-batch {micro}: no activation from the previous stage"
            ))
        })?;
        let leaf = Var::from_tensor(&input)?;
        let output = self
            .model
            .forward(StageInput::Activations(leaf.as_tensor()))?;
        Ok((Some(leaf), output))
    }

    fn targets(&self, micro: usize) -> Result<&Tensor> {
        self.targets.get(micro).ok_or_else(|| missing(micro))
    }
}

fn missing(micro: usize) -> TrainerError {
    TrainerError::Config(format!("micro-batch {micro} was not loaded"))
}

impl PipelineStage for LanguageModelStage<'_> {
    fn forward(&mut self, micro: usize, input: Option<Tensor>) -> Result<Option<Tensor>> {
        let (leaf, output) = self.run(micro, input)?;
        if self.last {
            let loss = TransformerStage::loss(&output, self.targets(micro)?)?;
            // A non-finite loss propagates into `loss()`: the training loop decides whether it
            // is an fp16 overflow (skip the step) or a divergence.
            let value = f64::from(loss.to_scalar::<f32>()?);
            self.loss += value * self.loss_scale;
            let scaled = loss.affine(self.loss_scale * self.gradient_scale, 0.0)?;
            self.saved.insert(
                micro,
                Saved {
                    input: leaf,
                    output: scaled,
                },
            );
            return Ok(None);
        }
        self.saved.insert(
            micro,
            Saved {
                input: leaf,
                output: output.clone(),
            },
        );
        Ok(Some(output))
    }

    fn backward(
        &mut self,
        micro: usize,
        output_gradient: Option<Tensor>,
    ) -> Result<Option<Tensor>> {
        let saved = self.saved.remove(&micro).ok_or_else(|| {
            TrainerError::Config(format!(
                "backward of micro-batch {micro} before its forward"
            ))
        })?;
        let gradients = match output_gradient {
            None if self.last => saved.output.backward()?,
            Some(gradient) if !self.last => saved
                .output
                .apply_op1(SeedGradient { gradient })?
                .backward()?,
            _ => {
                return Err(TrainerError::Config(format!(
                    "micro-batch {micro}: an output gradient is expected on every stage but the last"
                )));
            }
        };
        let parameters = self.model.parameters();
        for (index, parameter) in parameters.iter().enumerate() {
            let range = parameter.flat_range();
            parameters.read_gradient(index, &gradients, &mut self.scratch[range.clone()], 1.0)?;
            for (sum, value) in self.gradients[range.clone()]
                .iter_mut()
                .zip(&self.scratch[range])
            {
                *sum += value;
            }
        }
        let input_gradient = match &saved.input {
            Some(leaf) => Some(
                gradients
                    .get(leaf.as_tensor())
                    .ok_or_else(|| {
                        TrainerError::Config(format!(
                            "micro-batch {micro}: the input has no gradient"
                        ))
                    })?
                    .detach(),
            ),
            None => None,
        };
        Ok(input_gradient)
    }

    fn forward_only(&mut self, micro: usize, input: Option<Tensor>) -> Result<Option<Tensor>> {
        let (_, output) = self.run(micro, input)?;
        if !self.last {
            return Ok(Some(output.detach()));
        }
        let targets = self.targets(micro)?;
        let loss = TransformerStage::loss(&output, targets)?.to_scalar::<f32>()?;
        let (batch, sequence, vocabulary) = output.dims3()?;
        let predictions = output
            .reshape((batch * sequence, vocabulary))?
            .argmax(1)?
            .to_vec1::<u32>()?;
        let targets = targets.flatten_all()?.to_vec1::<u32>()?;
        let correct = predictions
            .iter()
            .zip(&targets)
            .filter(|(p, t)| p == t)
            .count();
        let tokens = targets.len() as f64;
        self.evaluation.loss += f64::from(loss) * tokens;
        self.evaluation.correct += correct as f64;
        self.evaluation.tokens += tokens;
        Ok(None)
    }
}
