//! `[train]`: the numeric precision a training job computes and communicates in, and fp16's
//! dynamic loss scaling.
//!
//! ```toml
//! [train]
//! precision = "fp16"        # forward and backward in fp16, fp32 master weights
//! grad_comm_dtype = "fp16"  # gradients travel in fp16, summed in fp32 by the collective
//! initial_loss_scale = 65536
//! ```

use serde::{Deserialize, Serialize};

use crate::problems::Problems;

/// A floating-point format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE single precision.
    #[default]
    Fp32,
    /// bfloat16: fp32's range, 8 bits of mantissa.
    Bf16,
    /// IEEE half precision: 11 bits of mantissa, largest finite value 65,504.
    Fp16,
}

impl Precision {
    /// The format's name in job specs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
            Self::Fp16 => "fp16",
        }
    }
}

/// Largest loss scale.
pub const MAX_LOSS_SCALE: f64 = 16_777_216.0;
/// Default first loss scale of fp16 training: 2^16.
pub const DEFAULT_INITIAL_LOSS_SCALE: f64 = 65_536.0;
/// Default clean steps between loss-scale growths.
pub const DEFAULT_LOSS_SCALE_GROWTH_INTERVAL: u64 = 2000;

/// `[train]`: precision and loss scaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSpec {
    /// Format of the forward and backward passes: `"fp32"`, `"bf16"` or `"fp16"`. With bf16 or
    /// fp16 the optimizer keeps fp32 master weights and state and refreshes a working copy in
    /// that format after every step. Default `"fp32"`.
    pub precision: Precision,
    /// Format gradients are exchanged in (all-reduce, parameter-server pushes); the collective
    /// sums in fp32 and rounds once. Default: `precision`.
    pub grad_comm_dtype: Option<Precision>,
    /// fp16 only: the loss scale of the first step (1 to 2^24). Default 65,536.
    pub initial_loss_scale: Option<f64>,
    /// fp16 only: the scale is multiplied by `loss_scale_growth_factor` after this many steps
    /// in a row without overflow (1 to 1,000,000). Default 2000.
    pub loss_scale_growth_interval: Option<u64>,
    /// fp16 only: growth factor (above 1, at most 16). Default 2.
    pub loss_scale_growth_factor: Option<f64>,
    /// fp16 only: factor applied on overflow (above 0, below 1). Default 0.5.
    pub loss_scale_backoff_factor: Option<f64>,
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            precision: Precision::Fp32,
            grad_comm_dtype: None,
            initial_loss_scale: None,
            loss_scale_growth_interval: None,
            loss_scale_growth_factor: None,
            loss_scale_backoff_factor: None,
        }
    }
}

/// Dynamic loss scaling, with every default applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaling {
    /// Scale of the first step.
    pub initial_scale: f64,
    /// Clean steps between growths.
    pub growth_interval: u64,
    /// Growth factor.
    pub growth_factor: f64,
    /// Backoff factor on overflow.
    pub backoff_factor: f64,
}

impl TrainSpec {
    /// Format gradients are exchanged in.
    pub fn grad_comm_dtype(&self) -> Precision {
        self.grad_comm_dtype.unwrap_or(self.precision)
    }

    /// The loss scaling of fp16 training; `None` for fp32 and bf16, which need none.
    pub fn loss_scaling(&self) -> Option<LossScaling> {
        (self.precision == Precision::Fp16).then(|| LossScaling {
            initial_scale: self
                .initial_loss_scale
                .unwrap_or(DEFAULT_INITIAL_LOSS_SCALE),
            growth_interval: self
                .loss_scale_growth_interval
                .unwrap_or(DEFAULT_LOSS_SCALE_GROWTH_INTERVAL),
            growth_factor: self.loss_scale_growth_factor.unwrap_or(2.0),
            backoff_factor: self.loss_scale_backoff_factor.unwrap_or(0.5),
        })
    }

    /// Records every problem of the section.
    pub fn validate(&self, problems: &mut Problems) {
        let scaling_fields = [
            ("initial_loss_scale", self.initial_loss_scale.is_some()),
            (
                "loss_scale_growth_interval",
                self.loss_scale_growth_interval.is_some(),
            ),
            (
                "loss_scale_growth_factor",
                self.loss_scale_growth_factor.is_some(),
            ),
            (
                "loss_scale_backoff_factor",
                self.loss_scale_backoff_factor.is_some(),
            ),
        ];
        if self.precision != Precision::Fp16 {
            for (field, present) in scaling_fields {
                if present {
                    problems.push(
                        format!("train.{field}"),
                        "only allowed with precision = \"fp16\" (bf16 and fp32 need no loss scaling)",
                    );
                }
            }
            return;
        }
        if let Some(scale) = self.initial_loss_scale
            && !(scale.is_finite() && (1.0..=MAX_LOSS_SCALE).contains(&scale))
        {
            problems.push(
                "train.initial_loss_scale",
                format!("{scale}, expected 1 to {MAX_LOSS_SCALE}"),
            );
        }
        if let Some(interval) = self.loss_scale_growth_interval {
            problems.check_range("train.loss_scale_growth_interval", interval, 1, 1_000_000);
        }
        if let Some(factor) = self.loss_scale_growth_factor
            && !(factor.is_finite() && factor > 1.0 && factor <= 16.0)
        {
            problems.push(
                "train.loss_scale_growth_factor",
                format!("{factor}, expected above 1 and at most 16"),
            );
        }
        if let Some(factor) = self.loss_scale_backoff_factor
            && !(factor.is_finite() && factor > 0.0 && factor < 1.0)
        {
            problems.push(
                "train.loss_scale_backoff_factor",
                format!("{factor}, expected above 0 and below 1"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;
    use crate::problems::problem_strings;

    #[test]
    fn fp16_gets_dynamic_loss_scaling_and_bf16_none() {
        let spec = parse("version = 1\nkind = \"train\"\n[train]\nprecision = \"fp16\"\n").unwrap();
        let train = spec.train.unwrap();
        assert_eq!(train.grad_comm_dtype(), Precision::Fp16);
        let scaling = train.loss_scaling().unwrap();
        assert_eq!(scaling.initial_scale, 65_536.0);
        assert_eq!(scaling.growth_interval, 2000);
        assert_eq!((scaling.growth_factor, scaling.backoff_factor), (2.0, 0.5));
        let spec = parse(
            "version = 1\nkind = \"train\"\n[train]\nprecision = \"bf16\"\ngrad_comm_dtype = \"fp32\"\n",
        )
        .unwrap();
        let train = spec.train.unwrap();
        assert!(train.loss_scaling().is_none());
        assert_eq!(train.grad_comm_dtype(), Precision::Fp32);
    }

    #[test]
    fn bad_precision_settings_name_their_field() {
        for (text, field) in [
            (
                "precision = \"bf16\"\ninitial_loss_scale = 8.0",
                "train.initial_loss_scale",
            ),
            (
                "precision = \"fp16\"\ninitial_loss_scale = 0.5",
                "train.initial_loss_scale",
            ),
            (
                "precision = \"fp16\"\nloss_scale_backoff_factor = 1.5",
                "train.loss_scale_backoff_factor",
            ),
            ("precision = \"fp8\"", "train.precision"),
        ] {
            let problems =
                problem_strings(&format!("version = 1\nkind = \"train\"\n[train]\n{text}\n"));
            assert!(
                problems.iter().any(|p| p.starts_with(field)),
                "{text}: {problems:?}"
            );
        }
    }
}
