//! A rank's optimizer (SGD with momentum, AdamW) over its model's parameters.
//!
//! The update rules are `cohort_numerics`' (PyTorch's `torch.optim.SGD`, dampening 0, no
//! Nesterov, and `torch.optim.AdamW`, exactly), the ones parameter servers apply too. They run
//! over the flat averaged gradient and write the parameters in place in their candle storage;
//! the optimizer state (momentum buffers, moment estimates) is flat too, in the same order,
//! which is what checkpoints store. Gradient clipping is part of the step (`run::step`).

use cohort_jobspec::train::OptimizerSpec;
use cohort_numerics::optimizer::apply_to_slice;
use cohort_numerics::{OptimizerConfig, UpdateConstants};

pub use cohort_numerics::{LearningRateSchedule, OptimizerState};

use crate::error::{Result, TrainerError};
use crate::parameters::ParameterSet;

/// An optimizer over a flat parameter vector.
#[derive(Debug, Clone)]
pub struct Optimizer {
    /// Hyper-parameters, defaults applied.
    config: OptimizerConfig,
    /// Momentum or moment buffers.
    state: OptimizerState,
    /// Updates applied so far (AdamW's bias correction uses it).
    steps_taken: u64,
}

impl Optimizer {
    /// Creates an optimizer for `element_count` parameters with zeroed state, or an error if
    /// the state's memory cannot be reserved.
    pub fn new(spec: &OptimizerSpec, element_count: usize) -> Result<Self> {
        let config = spec.config();
        let state = OptimizerState::new(&config, element_count)?;
        Ok(Self {
            config,
            state,
            steps_taken: 0,
        })
    }

    /// Returns the number of updates applied.
    pub fn steps_taken(&self) -> u64 {
        self.steps_taken
    }

    /// Returns the state buffers.
    pub fn state(&self) -> &OptimizerState {
        &self.state
    }

    /// Restores state saved by a checkpoint: `buffers` must name every buffer of this kind with
    /// the right length.
    pub fn restore(&mut self, steps_taken: u64, buffers: &[(String, Vec<f32>)]) -> Result<()> {
        for (name, buffer) in self.state.buffers_mut() {
            let Some((_, saved)) = buffers.iter().find(|(saved_name, _)| saved_name == name) else {
                return Err(TrainerError::Config(format!(
                    "optimizer state lacks {name}, expected it for {:?}",
                    self.config.kind
                )));
            };
            if saved.len() != buffer.len() {
                return Err(TrainerError::Config(format!(
                    "optimizer {name} of {} elements, expected {}",
                    saved.len(),
                    buffer.len()
                )));
            }
            buffer.copy_from_slice(saved);
        }
        self.steps_taken = steps_taken;
        Ok(())
    }

    /// Applies one update with `learning_rate` to `parameters` from the flat averaged
    /// `gradients`.
    pub fn step(
        &mut self,
        parameters: &ParameterSet,
        gradients: &[f32],
        learning_rate: f64,
    ) -> Result<()> {
        if gradients.len() != parameters.element_count() {
            return Err(TrainerError::Config(format!(
                "{} gradients for {} parameters",
                gradients.len(),
                parameters.element_count()
            )));
        }
        self.steps_taken += 1;
        // The same update rules as the parameter server's, over each parameter's storage.
        let constants = UpdateConstants::new(&self.config, learning_rate, self.steps_taken);
        for (index, parameter) in parameters.iter().enumerate() {
            let range = parameter.flat_range();
            let gradient = &gradients[range.clone()];
            let mut outcome = Ok(());
            parameters.update(index, |values| {
                outcome =
                    apply_to_slice(&constants, values, &mut self.state, range.clone(), gradient);
            })?;
            outcome?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use candle_nn::optim::{AdamW, Optimizer as _, ParamsAdamW};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::parameters::Initialization;
    use cohort_jobspec::train::OptimizerKind;

    fn one_parameter(values: &[f32]) -> ParameterSet {
        let mut set = ParameterSet::new(Device::Cpu);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        set.add("p", values.len(), Initialization::Zeros, &mut rng)
            .unwrap();
        set.write_values(values).unwrap();
        set
    }

    fn values(set: &ParameterSet) -> Vec<f32> {
        let mut flat = vec![0.0; set.element_count()];
        set.read_values(&mut flat).unwrap();
        flat
    }

    #[test]
    fn sgd_momentum_matches_hand_computed_steps() {
        let spec = OptimizerSpec {
            kind: OptimizerKind::Sgd,
            lr: Some(0.1),
            momentum: Some(0.9),
            weight_decay: Some(0.01),
            ..OptimizerSpec::default()
        };
        let set = one_parameter(&[1.0]);
        let mut optimizer = Optimizer::new(&spec, 1).unwrap();
        // Step 1: g = 0.5 + 0.01 * 1 = 0.51; v = 0.51; p = 1 - 0.051 = 0.949.
        optimizer.step(&set, &[0.5], 0.1).unwrap();
        assert!((values(&set)[0] - 0.949).abs() < 1e-7);
        // Step 2: g = -0.2 + 0.00949 = -0.19051; v = 0.459 - 0.19051 = 0.26849;
        // p = 0.949 - 0.026849 = 0.922151.
        optimizer.step(&set, &[-0.2], 0.1).unwrap();
        assert!(
            (values(&set)[0] - 0.922151).abs() < 1e-6,
            "{:?}",
            values(&set)
        );
        // With momentum 0 there is no buffer: p = 2 - 0.5 * 1 = 1.5.
        let plain = OptimizerSpec {
            momentum: Some(0.0),
            weight_decay: None,
            ..spec
        };
        let set = one_parameter(&[2.0]);
        let mut optimizer = Optimizer::new(&plain, 1).unwrap();
        optimizer.step(&set, &[1.0], 0.5).unwrap();
        assert_eq!(values(&set), vec![1.5]);
        assert_eq!(optimizer.state().buffers()[0].1.len(), 0);
    }

    #[test]
    fn adamw_matches_hand_computed_first_steps() {
        let spec = OptimizerSpec {
            kind: OptimizerKind::Adamw,
            weight_decay: Some(0.1),
            ..OptimizerSpec::default()
        };
        let set = one_parameter(&[1.0, -3.0]);
        let mut optimizer = Optimizer::new(&spec, 2).unwrap();
        optimizer.step(&set, &[0.5, -4.0], 0.01).unwrap();
        // First step: m_hat = g, v_hat = g^2, so the step is lr * sign(g) (up to eps),
        // after decay p *= 1 - 0.01 * 0.1.
        let got = values(&set);
        let expected = [1.0 * 0.999 - 0.01, -3.0 * 0.999 + 0.01];
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-6, "{got:?} vs {expected:?}");
        }
        // Second step with g = 0.5 again for element 0, in f64 by hand.
        optimizer.step(&set, &[0.5, 0.0], 0.01).unwrap();
        let (b1, b2, lr, wd, eps) = (0.9f64, 0.999f64, 0.01f64, 0.1f64, 1e-8f64);
        let p = (1.0 * 0.999 - 0.01) * (1.0 - lr * wd);
        let m = b1 * (0.1 * 0.5) + 0.1 * 0.5;
        let v = b2 * (0.001 * 0.25) + 0.001 * 0.25;
        let update = lr * (m / (1.0 - b1 * b1)) / ((v / (1.0 - b2 * b2)).sqrt() + eps);
        assert!((f64::from(values(&set)[0]) - (p - update)).abs() < 1e-6);
    }

    #[test]
    fn adamw_matches_candle_reference_over_many_steps() {
        let spec = OptimizerSpec {
            kind: OptimizerKind::Adamw,
            lr: Some(0.003),
            betas: Some([0.8, 0.99]),
            eps: Some(1e-6),
            weight_decay: Some(0.05),
            ..OptimizerSpec::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut set = ParameterSet::new(Device::Cpu);
        set.add("p", 64, Initialization::HeUniform { fan_in: 4 }, &mut rng)
            .unwrap();
        let initial = values(&set);
        let reference = Var::from_slice(&initial, 64, &Device::Cpu).unwrap();
        let mut candle_adamw = AdamW::new(
            vec![reference.clone()],
            ParamsAdamW {
                lr: 0.003,
                beta1: 0.8,
                beta2: 0.99,
                eps: 1e-6,
                weight_decay: 0.05,
            },
        )
        .unwrap();
        let mut optimizer = Optimizer::new(&spec, 64).unwrap();
        for step in 0..30 {
            // Loss sum(p^3 / 3 + step * p) has gradient p^2 + step: feed both the same one.
            let gradient: Vec<f32> = values(&set)
                .iter()
                .map(|p| p * p + step as f32 * 0.1)
                .collect();
            let loss = ((reference.as_tensor().powf(3.0).unwrap() / 3.0).unwrap()
                + (reference.as_tensor() * (step as f64 * 0.1)).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
            candle_adamw.backward_step(&loss).unwrap();
            optimizer.step(&set, &gradient, 0.003).unwrap();
        }
        let expected = reference.as_tensor().to_vec1::<f32>().unwrap();
        let got = values(&set);
        let max_difference = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max_difference < 1e-5, "max difference {max_difference}");
        assert!(got.iter().zip(&initial).any(|(a, b)| (a - b).abs() > 0.01));
    }

    #[test]
    fn sgd_without_momentum_matches_candle_reference() {
        let initial = [0.5f32, -1.5, 2.0];
        let set = one_parameter(&initial);
        let reference = Var::from_slice(&initial, 3, &Device::Cpu).unwrap();
        let mut candle_sgd = candle_nn::optim::SGD::new(vec![reference.clone()], 0.05).unwrap();
        let spec = OptimizerSpec {
            kind: OptimizerKind::Sgd,
            momentum: Some(0.0),
            ..OptimizerSpec::default()
        };
        let mut optimizer = Optimizer::new(&spec, 3).unwrap();
        for _ in 0..10 {
            let gradient: Vec<f32> = values(&set).iter().map(|p| 2.0 * p).collect();
            let loss = reference.as_tensor().sqr().unwrap().sum_all().unwrap();
            candle_sgd.backward_step(&loss).unwrap();
            optimizer.step(&set, &gradient, 0.05).unwrap();
        }
        let expected = reference.as_tensor().to_vec1::<f32>().unwrap();
        for (g, e) in values(&set).iter().zip(&expected) {
            assert!((g - e).abs() < 1e-6);
        }
        // Analytically p_10 = p_0 * (1 - 0.1)^10.
        assert!((expected[2] - 2.0 * 0.9f32.powi(10)).abs() < 1e-5);
    }

    #[test]
    fn restore_checks_names_and_lengths() {
        let spec = OptimizerSpec::default();
        let mut optimizer = Optimizer::new(&spec, 2).unwrap();
        let saved = vec![
            ("first_moment".to_owned(), vec![1.0, 2.0]),
            ("second_moment".to_owned(), vec![3.0, 4.0]),
        ];
        optimizer.restore(7, &saved).unwrap();
        assert_eq!(optimizer.steps_taken(), 7);
        assert_eq!(optimizer.state().buffers()[1].1, &[3.0, 4.0]);
        assert!(optimizer.restore(7, &saved[..1]).is_err());
        let short = vec![
            ("first_moment".to_owned(), vec![1.0]),
            ("second_moment".to_owned(), vec![3.0, 4.0]),
        ];
        assert!(optimizer.restore(7, &short).is_err());
    }

    #[test]
    fn wrong_gradient_length_is_an_error() {
        let set = one_parameter(&[1.0, 2.0]);
        let mut optimizer = Optimizer::new(&OptimizerSpec::default(), 2).unwrap();
        assert!(optimizer.step(&set, &[1.0], 0.1).is_err());
    }
}
