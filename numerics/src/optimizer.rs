//! The update rules over flat `f32` buffers: SGD with momentum and AdamW.
//!
//! The rules are those of `torch.optim.SGD` (dampening 0, no Nesterov) and `torch.optim.AdamW`.
//! Training ranks (over each parameter's storage) and parameter servers (over a shard's
//! buffers) apply these same functions, so a job switched from all-reduce to a parameter server
//! keeps its hyper-parameters and, in sync mode, its results. State is kept per buffer (a
//! shard's dense elements, each embedding-table part, a rank's flat parameters), element for
//! element.
//!
//! Row-sparse updates are lazy, as TensorFlow's `LazyAdam`: only the rows a push touched are
//! updated (their decay, momentum and moments included); untouched rows stay as they are.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The optimizer's update rule (the job spec's `[optimizer] kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Stochastic gradient descent with (heavy-ball) momentum, as `torch.optim.SGD` (dampening
    /// 0, no Nesterov).
    Sgd,
    /// Adam with decoupled weight decay, as `torch.optim.AdamW`.
    #[default]
    Adamw,
}

/// Hyper-parameters of an update rule: the job spec's `[optimizer]` with every default already
/// applied (`OptimizerSpec::config` in the spec crate builds it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Update rule. Default `adamw`.
    pub kind: OptimizerKind,
    /// Peak learning rate, reached after warmup. Default 0.001.
    pub learning_rate: f64,
    /// SGD momentum factor, 0 to below 1 (0 keeps no momentum buffer). Default 0.9.
    pub momentum: f64,
    /// AdamW decay rate of the first moment estimate. Default 0.9.
    pub beta1: f64,
    /// AdamW decay rate of the second moment estimate. Default 0.999.
    pub beta2: f64,
    /// AdamW term added to the denominator. Default 1e-8.
    pub eps: f64,
    /// L2 penalty added to the gradient (SGD) or decoupled decay (AdamW). Default 0.
    pub weight_decay: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Adamw,
            learning_rate: 0.001,
            momentum: 0.9,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// State an optimizer keeps for one buffer, element for element.
#[derive(Debug, Clone, PartialEq)]
pub enum OptimizerState {
    /// SGD's velocity (empty when momentum is 0).
    Sgd {
        /// Velocity of every element.
        momentum_buffer: Vec<f32>,
    },
    /// AdamW's exponential moving averages.
    AdamW {
        /// Moving average of the gradient.
        first_moment: Vec<f32>,
        /// Moving average of the squared gradient.
        second_moment: Vec<f32>,
    },
}

impl OptimizerState {
    /// Creates zeroed state for `element_count` elements, or an error if the memory cannot be
    /// reserved.
    pub fn new(config: &OptimizerConfig, element_count: usize) -> Result<Self> {
        Ok(match config.kind {
            OptimizerKind::Sgd => OptimizerState::Sgd {
                momentum_buffer: if config.momentum == 0.0 {
                    Vec::new()
                } else {
                    zeroed(element_count, "optimizer state")?
                },
            },
            OptimizerKind::Adamw => OptimizerState::AdamW {
                first_moment: zeroed(element_count, "optimizer state")?,
                second_moment: zeroed(element_count, "optimizer state")?,
            },
        })
    }

    /// Returns the buffers with the names snapshots store them under.
    pub fn buffers(&self) -> Vec<(&'static str, &[f32])> {
        match self {
            OptimizerState::Sgd { momentum_buffer } => vec![("momentum_buffer", momentum_buffer)],
            OptimizerState::AdamW {
                first_moment,
                second_moment,
            } => vec![
                ("first_moment", first_moment),
                ("second_moment", second_moment),
            ],
        }
    }

    /// Returns the buffers mutably, with their snapshot names.
    pub fn buffers_mut(&mut self) -> Vec<(&'static str, &mut Vec<f32>)> {
        match self {
            OptimizerState::Sgd { momentum_buffer } => vec![("momentum_buffer", momentum_buffer)],
            OptimizerState::AdamW {
                first_moment,
                second_moment,
            } => vec![
                ("first_moment", first_moment),
                ("second_moment", second_moment),
            ],
        }
    }

    /// Returns the bytes the state holds per parameter element (for memory bounds).
    pub fn bytes_per_element(config: &OptimizerConfig) -> u64 {
        match config.kind {
            OptimizerKind::Sgd if config.momentum == 0.0 => 0,
            OptimizerKind::Sgd => 4,
            OptimizerKind::Adamw => 8,
        }
    }
}

/// Returns a zeroed vector of `element_count` elements, or an error naming `what` if the memory
/// cannot be reserved.
pub fn zeroed(element_count: usize, what: &'static str) -> Result<Vec<f32>> {
    let mut values = Vec::new();
    values
        .try_reserve_exact(element_count)
        .map_err(|_| Error::OutOfMemory {
            what,
            bytes: element_count as u64 * 4,
        })?;
    values.resize(element_count, 0.0);
    Ok(values)
}

/// The constants of one update, computed once and applied to every buffer it updates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpdateConstants {
    /// `torch.optim.SGD`: `g += wd * p; v = mu * v + g; p -= lr * v`.
    Sgd {
        /// Learning rate.
        lr: f32,
        /// Momentum factor.
        momentum: f32,
        /// L2 penalty.
        weight_decay: f32,
    },
    /// `torch.optim.AdamW` at update number `t`.
    AdamW {
        /// Learning rate.
        lr: f32,
        /// First moment decay.
        beta1: f32,
        /// Second moment decay.
        beta2: f32,
        /// Denominator term.
        eps: f32,
        /// Decoupled decay.
        weight_decay: f32,
        /// `lr / (1 - beta1^t)`.
        step_size: f32,
        /// `sqrt(1 - beta2^t)`.
        second_correction_sqrt: f32,
    },
}

impl UpdateConstants {
    /// Returns the constants of the `update_number`-th update (1-based) at `learning_rate`.
    pub fn new(config: &OptimizerConfig, learning_rate: f64, update_number: u64) -> Self {
        match config.kind {
            OptimizerKind::Sgd => Self::sgd(learning_rate, config.momentum, config.weight_decay),
            OptimizerKind::Adamw => Self::adamw(
                learning_rate,
                [config.beta1, config.beta2],
                config.eps,
                config.weight_decay,
                update_number,
            ),
        }
    }

    /// SGD's constants: `momentum` 0 means plain SGD; `weight_decay` is an L2 penalty.
    pub fn sgd(learning_rate: f64, momentum: f64, weight_decay: f64) -> Self {
        UpdateConstants::Sgd {
            lr: learning_rate as f32,
            momentum: momentum as f32,
            weight_decay: weight_decay as f32,
        }
    }

    /// AdamW's constants for its `update_number`-th update (1-based), bias corrections
    /// included; `weight_decay` is decoupled.
    pub fn adamw(
        learning_rate: f64,
        [beta1, beta2]: [f64; 2],
        eps: f64,
        weight_decay: f64,
        update_number: u64,
    ) -> Self {
        let exponent = update_number.min(i32::MAX as u64) as i32;
        UpdateConstants::AdamW {
            lr: learning_rate as f32,
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            eps: eps as f32,
            weight_decay: weight_decay as f32,
            step_size: (learning_rate / (1.0 - beta1.powi(exponent))) as f32,
            second_correction_sqrt: (1.0 - beta2.powi(exponent)).sqrt() as f32,
        }
    }
}

/// Applies one update to `values[range]` from `gradient` (of the range's length), with the
/// state of the same elements. Callers check lengths; state of the wrong kind is an error.
pub fn apply(
    constants: &UpdateConstants,
    values: &mut [f32],
    state: &mut OptimizerState,
    range: std::ops::Range<usize>,
    gradient: &[f32],
) -> Result<()> {
    apply_to_slice(
        constants,
        &mut values[range.clone()],
        state,
        range,
        gradient,
    )
}

/// Applies one update to `values`, the elements at `range` of the buffer `state` covers (the
/// trainer updates one parameter's storage at a time). State of the wrong kind is an error.
pub fn apply_to_slice(
    constants: &UpdateConstants,
    values: &mut [f32],
    state: &mut OptimizerState,
    range: std::ops::Range<usize>,
    gradient: &[f32],
) -> Result<()> {
    match (constants, state) {
        (
            UpdateConstants::Sgd {
                lr,
                momentum,
                weight_decay,
            },
            OptimizerState::Sgd { momentum_buffer },
        ) => {
            if momentum_buffer.is_empty() {
                for (p, &g) in values.iter_mut().zip(gradient) {
                    *p -= lr * (g + weight_decay * *p);
                }
            } else {
                let velocity = &mut momentum_buffer[range];
                for ((p, &g), v) in values.iter_mut().zip(gradient).zip(velocity) {
                    let g = g + weight_decay * *p;
                    *v = momentum * *v + g;
                    *p -= lr * *v;
                }
            }
        }
        (
            UpdateConstants::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                step_size,
                second_correction_sqrt,
            },
            OptimizerState::AdamW {
                first_moment,
                second_moment,
            },
        ) => {
            let decay = 1.0 - lr * weight_decay;
            let first = &mut first_moment[range.clone()];
            let second = &mut second_moment[range];
            for (((p, &g), m), v) in values.iter_mut().zip(gradient).zip(first).zip(second) {
                *p *= decay;
                *m = beta1 * *m + (1.0 - beta1) * g;
                *v = beta2 * *v + (1.0 - beta2) * g * g;
                let denominator = v.sqrt() / second_correction_sqrt + eps;
                *p -= step_size * *m / denominator;
            }
        }
        _ => {
            return Err(Error::StateMismatch);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{LearningRateDecay, LearningRateSchedule};

    /// Independent f64 reference of `torch.optim.SGD` and `torch.optim.AdamW` for one element
    /// sequence, written from the PyTorch documentation's pseudo-code.
    fn reference(config: &OptimizerConfig, start: f64, gradients: &[f64], lr: &[f64]) -> f64 {
        let (mut p, mut m, mut v) = (start, 0.0f64, 0.0f64);
        for (t, (&g, &lr)) in gradients.iter().zip(lr).enumerate() {
            let t = (t + 1) as i32;
            match config.kind {
                OptimizerKind::Sgd => {
                    let g = g + config.weight_decay * p;
                    m = if t == 1 { g } else { config.momentum * m + g };
                    p -= lr * if config.momentum == 0.0 { g } else { m };
                }
                OptimizerKind::Adamw => {
                    p -= lr * config.weight_decay * p;
                    m = config.beta1 * m + (1.0 - config.beta1) * g;
                    v = config.beta2 * v + (1.0 - config.beta2) * g * g;
                    let m_hat = m / (1.0 - config.beta1.powi(t));
                    let v_hat = v / (1.0 - config.beta2.powi(t));
                    p -= lr * m_hat / (v_hat.sqrt() + config.eps);
                }
            }
        }
        p
    }

    fn run(
        config: &OptimizerConfig,
        starts: &[f32],
        gradients: &[Vec<f32>],
        lr: &[f64],
    ) -> Vec<f32> {
        let mut values = starts.to_vec();
        let mut state = OptimizerState::new(config, values.len()).unwrap();
        for (index, (gradient, &lr)) in gradients.iter().zip(lr).enumerate() {
            let constants = UpdateConstants::new(config, lr, index as u64 + 1);
            apply(
                &constants,
                &mut values,
                &mut state,
                0..starts.len(),
                gradient,
            )
            .unwrap();
        }
        values
    }

    #[test]
    fn sgd_momentum_matches_hand_computed_steps() {
        let config = OptimizerConfig {
            kind: OptimizerKind::Sgd,
            momentum: 0.9,
            weight_decay: 0.01,
            ..OptimizerConfig::default()
        };
        // Step 1: g = 0.5 + 0.01 = 0.51; v = 0.51; p = 1 - 0.051 = 0.949.
        // Step 2: g = -0.2 + 0.00949 = -0.19051; v = 0.459 - 0.19051 = 0.26849;
        // p = 0.949 - 0.026849 = 0.922151.
        let values = run(&config, &[1.0], &[vec![0.5], vec![-0.2]], &[0.1, 0.1]);
        assert!((values[0] - 0.922151).abs() < 1e-6, "{values:?}");
        let plain = OptimizerConfig {
            momentum: 0.0,
            weight_decay: 0.0,
            ..config
        };
        assert_eq!(run(&plain, &[2.0], &[vec![1.0]], &[0.5]), vec![1.5]);
        assert_eq!(
            OptimizerState::new(&plain, 3).unwrap().buffers()[0].1.len(),
            0
        );
    }

    #[test]
    fn both_rules_match_an_f64_reference_over_many_steps() {
        let configs = [
            OptimizerConfig {
                kind: OptimizerKind::Sgd,
                momentum: 0.9,
                weight_decay: 0.001,
                ..OptimizerConfig::default()
            },
            OptimizerConfig {
                kind: OptimizerKind::Adamw,
                beta1: 0.8,
                beta2: 0.99,
                eps: 1e-6,
                weight_decay: 0.05,
                ..OptimizerConfig::default()
            },
        ];
        let starts: Vec<f32> = (0..16).map(|i| (i as f32 - 8.0) * 0.1).collect();
        let gradients: Vec<Vec<f32>> = (0..40)
            .map(|step| {
                (0..16)
                    .map(|i| ((step * 7 + i * 3) % 11) as f32 * 0.05 - 0.25)
                    .collect()
            })
            .collect();
        let schedule = LearningRateSchedule::new(0.01, 5, LearningRateDecay::Cosine, 40);
        let lr: Vec<f64> = (0..40).map(|step| schedule.learning_rate(step)).collect();
        for config in &configs {
            let got = run(config, &starts, &gradients, &lr);
            for (element, (&got, &start)) in got.iter().zip(&starts).enumerate() {
                let element_gradients: Vec<f64> =
                    gradients.iter().map(|g| f64::from(g[element])).collect();
                let expected = reference(config, f64::from(start), &element_gradients, &lr);
                assert!(
                    (f64::from(got) - expected).abs() <= 1e-5 * expected.abs().max(1.0),
                    "{:?} element {element}: {got} vs {expected}",
                    config.kind
                );
            }
        }
    }

    #[test]
    fn updates_touch_only_the_given_range() {
        let config = OptimizerConfig::default();
        let mut values = vec![1.0f32; 6];
        let mut state = OptimizerState::new(&config, 6).unwrap();
        let constants = UpdateConstants::new(&config, 0.1, 1);
        apply(&constants, &mut values, &mut state, 2..4, &[1.0, -1.0]).unwrap();
        assert_eq!(&values[..2], &[1.0, 1.0]);
        assert_eq!(&values[4..], &[1.0, 1.0]);
        assert!((values[2] - 0.9).abs() < 1e-6 && (values[3] - 1.1).abs() < 1e-6);
        let OptimizerState::AdamW { first_moment, .. } = &state else {
            panic!("adamw state expected");
        };
        assert_eq!(first_moment[0], 0.0);
        assert_ne!(first_moment[2], 0.0);
        let sgd = UpdateConstants::new(
            &OptimizerConfig {
                kind: OptimizerKind::Sgd,
                ..config
            },
            0.1,
            1,
        );
        assert!(apply(&sgd, &mut values, &mut state, 0..1, &[1.0]).is_err());
    }
}
