//! Generating text from a trained transformer, one character at a time.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::checkpoint::read_model;
use crate::error::{Result, TrainerError};
use crate::text::Vocabulary;
use crate::transformer::{StageInput, TransformerConfig, TransformerStage};

/// Longest text one call generates.
pub const MAX_GENERATED_TOKENS: usize = 100_000;

/// A whole model loaded from a checkpoint, ready to generate.
pub struct Sampler {
    /// The model, on one rank.
    model: TransformerStage,
    /// Its symbols.
    vocabulary: Vocabulary,
    /// Its context length.
    context: usize,
    /// Steps it was trained for.
    step: u64,
}

impl Sampler {
    /// Loads the transformer checkpoint at `path` (any mesh may have written it).
    pub fn load(path: &Path) -> Result<Self> {
        let (header, tensors) = read_model(path)?;
        let config = TransformerConfig {
            vocabulary: header.vocabulary.len(),
            shape: header.shape,
            seed: 0,
        };
        let model = TransformerStage::full(&config, &Device::Cpu)?;
        model.load_full(&|name| tensors.get(name).map(|(_, values)| values.clone()))?;
        Ok(Self {
            model,
            vocabulary: header.vocabulary,
            context: header.shape.context as usize,
            step: header.step,
        })
    }

    /// Steps the model was trained for.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Continues `prompt` by `tokens` characters, sampling each from the model's distribution
    /// sharpened by `temperature` (0: always the most likely), with `seed`.
    pub fn generate(
        &self,
        prompt: &str,
        tokens: usize,
        temperature: f64,
        seed: u64,
    ) -> Result<String> {
        if tokens > MAX_GENERATED_TOKENS {
            return Err(TrainerError::Config(format!(
                "{tokens} tokens, expected at most {MAX_GENERATED_TOKENS}"
            )));
        }
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(TrainerError::Config(format!(
                "temperature {temperature}, expected a finite value of at least 0"
            )));
        }
        let mut sequence = self.vocabulary.encode(prompt.as_bytes())?;
        if sequence.is_empty() {
            // An empty prompt starts from a newline when the text has one.
            sequence = self.vocabulary.encode(b"\n").unwrap_or_else(|_| vec![0]);
        }
        let start = sequence.len();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut probabilities = Vec::with_capacity(self.vocabulary.len());
        for _ in 0..tokens {
            let window = &sequence[sequence.len().saturating_sub(self.context)..];
            let input = Tensor::from_slice(window, (1, window.len()), &Device::Cpu)?;
            let logits = self.model.forward(StageInput::Tokens(&input))?;
            let last = logits.get(0)?.get(window.len() - 1)?.to_vec1::<f32>()?;
            let next = if temperature == 0.0 {
                argmax(&last)
            } else {
                let largest = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                probabilities.clear();
                probabilities.extend(
                    last.iter()
                        .map(|&logit| (f64::from(logit - largest) / temperature).exp()),
                );
                let total: f64 = probabilities.iter().sum();
                let mut draw = rng.random_range(0.0..total);
                probabilities
                    .iter()
                    .position(|&p| {
                        draw -= p;
                        draw < 0.0
                    })
                    .unwrap_or(probabilities.len() - 1)
            };
            sequence.push(next as u32);
        }
        Ok(self.vocabulary.decode(&sequence[start..]))
    }
}

fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (index, &value)| {
            if value > best.1 { (index, value) } else { best }
        })
        .0
}
