//! Sections of a `kind = "train"` job: what model is trained on which data, with which optimizer
//! and schedule, over how many ranks, and where checkpoints go.
//!
//! ```toml
//! version = 1
//! name = "fashion-mlp"
//! kind = "train"
//!
//! [model]
//! kind = "mlp"
//! hidden = [512, 256]
//!
//! [data]
//! dataset = "fashion-mnist"
//!
//! [optimizer]
//! kind = "adamw"
//! lr = 0.001
//!
//! [schedule]
//! epochs = 10
//! batch_size = 256
//! warmup_steps = 100
//! lr_decay = "cosine"
//!
//! [parallel]
//! data = 4
//! ```
//!
//! Every section is optional and every field has a default, so `kind = "train"` alone trains
//! the default MLP with AdamW on one rank. The fields that end a run early or prune its
//! checkpoints are checked with `[early_stopping]` ([`crate::early_stopping`]).

use serde::{Deserialize, Serialize};

use crate::job::{JobSpec, MAX_STRING_LEN};
use crate::problems::Problems;

pub use crate::checkpoint::CheckpointSpec;
pub use crate::parallel::{
    CollectiveBackend, Communication, HostTransport, ParallelSpec, PipelineSchedule, PsMode,
};
pub use cohort_numerics::{
    LearningRateDecay, LearningRateSchedule, OptimizerConfig, OptimizerKind,
};

/// Pixels of one Fashion-MNIST image (28 x 28); used to bound model sizes.
pub const INPUT_FEATURES: u64 = 28 * 28;
/// Classes of Fashion-MNIST; used to bound model sizes.
pub const CLASSES: u64 = 10;
/// Most hidden layers an MLP (or a CNN's dense head) may have.
pub const MAX_HIDDEN_LAYERS: usize = 16;
/// Widest hidden layer or most channels of one convolution.
pub const MAX_LAYER_WIDTH: u32 = 65_536;
/// Most convolution blocks of a CNN: each halves the 28 x 28 image, so 4 leave 1 x 1.
pub const MAX_CONVOLUTION_BLOCKS: usize = 4;
/// Most trainable parameters a model may have (400 MB of f32 per replica).
pub const MAX_PARAMETERS: u64 = 100_000_000;
/// Largest global batch.
pub const MAX_BATCH_SIZE: u32 = 65_536;
/// Most epochs of one job.
pub const MAX_EPOCHS: u32 = 10_000;
/// Most optimizer steps of one job (also bounds warmup and checkpoint intervals).
pub const MAX_STEPS: u64 = 1_000_000_000;
/// Smallest gradient bucket, in bytes.
pub const MIN_GRADIENT_BUCKET_BYTES: u64 = 4 * 1024;
/// Largest gradient bucket, in bytes.
pub const MAX_GRADIENT_BUCKET_BYTES: u64 = 1024 * 1024 * 1024;
/// Default gradient bucket: 25 MiB, as in PyTorch DDP.
pub const DEFAULT_GRADIENT_BUCKET_BYTES: u64 = 25 * 1024 * 1024;
/// Largest learning rate accepted.
pub const MAX_LEARNING_RATE: f64 = 10.0;
/// Default width of an embedding model's rows.
pub const DEFAULT_EMBEDDING_WIDTH: u32 = 32;
/// Widest embedding row.
pub const MAX_EMBEDDING_WIDTH: u32 = 4096;
/// Default intensity levels of an embedding model.
pub const DEFAULT_INTENSITY_LEVELS: u32 = 8;
/// Most intensity levels of an embedding model (one per 8-bit grey value).
pub const MAX_INTENSITY_LEVELS: u32 = 256;
/// Most parameter-server shards of one job.
pub const MAX_PS_SHARDS: u32 = 256;
/// Largest `ssp` staleness bound.
pub const MAX_STALENESS: u64 = 1_000_000;
/// `ssp` staleness bound unless given.
pub const DEFAULT_STALENESS: u64 = 2;
/// Largest pipeline or tensor-parallel degree.
pub const MAX_MESH_AXIS: u32 = 256;
/// Most micro-batches per step.
pub const MAX_MICRO_BATCHES: u32 = 1024;

/// Which model architecture `[model]` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Fully connected layers with ReLU between them.
    #[default]
    Mlp,
    /// 3x3 convolution blocks (convolution, ReLU, 2x2 max-pool) followed by a dense head.
    Cnn,
    /// A bag of pixel tokens: every non-background pixel becomes the token (position,
    /// intensity level); the image is the mean of its tokens' rows of an embedding table,
    /// followed by a dense head. With `parallel.comm = "ps"` the table is row-sparse: only the
    /// rows a batch touches travel.
    Embedding,
    /// A decoder-only (GPT-style) character-level language model: token and position
    /// embeddings, `layers` pre-LayerNorm blocks of causal self-attention and an MLP, a final
    /// LayerNorm and a linear head. Trains on `dataset = "shakespeare"`.
    Transformer,
}

/// `[model]`: which model to train and its shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSpec {
    /// Architecture: `"mlp"`, `"cnn"`, `"embedding"` or `"transformer"`. Default `"mlp"`.
    pub kind: ModelKind,
    /// Widths of the hidden dense layers (of the MLP, or of the CNN's head after its
    /// convolutions); the input and output widths come from the data set. Default `[512, 256]`.
    pub hidden: Vec<u32>,
    /// Output channels of each convolution block of a CNN; refused for an MLP.
    /// Default `[16, 32]` for a CNN.
    pub channels: Option<Vec<u32>>,
    /// Width of an embedding model's table rows (1 to 4096); refused for other kinds.
    /// Default 32 for `kind = "embedding"`.
    pub embedding_width: Option<u32>,
    /// Intensity levels an embedding model quantises pixels into (2 to 256; level 0 is
    /// background and has no token, so the table has `pixels x (levels - 1)` rows); refused
    /// for other kinds. Default 8 for `kind = "embedding"`.
    pub intensity_levels: Option<u32>,
    /// Transformer blocks (1 to 256); transformer only. Default 4.
    pub layers: Option<u32>,
    /// Attention heads per block (1 to 256, dividing `width`); transformer only. Default 4.
    pub heads: Option<u32>,
    /// Width of the residual stream (8 to 16,384); the MLP is 4 times wider; transformer
    /// only. Default 128.
    pub width: Option<u32>,
    /// Tokens of context (2 to 4,096); transformer only. Default 64.
    pub context: Option<u32>,
    /// Uses the token embedding as the output head too (not with `parallel.pipeline > 1`);
    /// transformer only. Default false.
    pub tie_embeddings: Option<bool>,
    /// Seed of the parameter initialisation (rank 0's values are broadcast to every rank).
    /// Default 0.
    pub seed: u64,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            kind: ModelKind::Mlp,
            hidden: vec![512, 256],
            channels: None,
            embedding_width: None,
            intensity_levels: None,
            layers: None,
            heads: None,
            width: None,
            context: None,
            tie_embeddings: None,
            seed: 0,
        }
    }
}

impl ModelSpec {
    /// Returns the convolution channels of a CNN (`[16, 32]` unless given); empty for an MLP.
    pub fn convolution_channels(&self) -> Vec<u32> {
        match self.kind {
            ModelKind::Mlp | ModelKind::Embedding | ModelKind::Transformer => Vec::new(),
            ModelKind::Cnn => self.channels.clone().unwrap_or_else(|| vec![16, 32]),
        }
    }

    /// Returns the width of an embedding model's rows (32 unless given).
    pub fn embedding_width(&self) -> u32 {
        self.embedding_width.unwrap_or(DEFAULT_EMBEDDING_WIDTH)
    }

    /// Returns the intensity levels of an embedding model (8 unless given).
    pub fn intensity_levels(&self) -> u32 {
        self.intensity_levels.unwrap_or(DEFAULT_INTENSITY_LEVELS)
    }

    /// Returns the rows of an embedding model's table for `pixels` pixels per image.
    pub fn embedding_rows(&self, pixels: u64) -> u64 {
        pixels.saturating_mul(u64::from(self.intensity_levels().saturating_sub(1)))
    }

    /// Returns the number of trainable parameters for `input_side x input_side` images with
    /// `classes` classes, saturating instead of overflowing.
    pub fn parameter_count(&self, input_side: u64, classes: u64) -> u64 {
        let mut count: u64 = 0;
        let mut features = input_side.saturating_mul(input_side);
        if self.kind == ModelKind::Cnn {
            let mut in_channels: u64 = 1;
            let mut side = input_side;
            for &out_channels in &self.convolution_channels() {
                let out_channels = u64::from(out_channels);
                count = count
                    .saturating_add(out_channels.saturating_mul(in_channels).saturating_mul(9))
                    .saturating_add(out_channels);
                in_channels = out_channels;
                side /= 2;
            }
            features = in_channels.saturating_mul(side).saturating_mul(side);
        }
        if self.kind == ModelKind::Embedding {
            let width = u64::from(self.embedding_width());
            count = self.embedding_rows(features).saturating_mul(width);
            features = width;
        }
        for width in self.hidden.iter().map(|&w| u64::from(w)).chain([classes]) {
            count = count
                .saturating_add(features.saturating_mul(width))
                .saturating_add(width);
            features = width;
        }
        count
    }

    fn validate(&self, problems: &mut Problems) {
        if self.hidden.len() > MAX_HIDDEN_LAYERS {
            problems.push(
                "model.hidden",
                format!(
                    "{} layers, expected at most {MAX_HIDDEN_LAYERS}",
                    self.hidden.len()
                ),
            );
        }
        for (i, &width) in self.hidden.iter().enumerate() {
            problems.check_range(&format!("model.hidden[{i}]"), width, 1, MAX_LAYER_WIDTH);
        }
        if self.kind != ModelKind::Embedding {
            for (field, present) in [
                ("embedding_width", self.embedding_width.is_some()),
                ("intensity_levels", self.intensity_levels.is_some()),
            ] {
                if present {
                    problems.push(
                        format!("model.{field}"),
                        "only allowed with kind = \"embedding\"",
                    );
                }
            }
        } else {
            problems.check_range(
                "model.embedding_width",
                self.embedding_width(),
                1,
                MAX_EMBEDDING_WIDTH,
            );
            problems.check_range(
                "model.intensity_levels",
                self.intensity_levels(),
                2,
                MAX_INTENSITY_LEVELS,
            );
        }
        match (self.kind, &self.channels) {
            (ModelKind::Mlp | ModelKind::Embedding | ModelKind::Transformer, Some(_)) => {
                problems.push("model.channels", "only allowed with kind = \"cnn\"");
            }
            (ModelKind::Cnn, Some(channels)) => {
                if channels.is_empty() || channels.len() > MAX_CONVOLUTION_BLOCKS {
                    problems.push(
                        "model.channels",
                        format!(
                            "{} blocks, expected 1 to {MAX_CONVOLUTION_BLOCKS}",
                            channels.len()
                        ),
                    );
                }
                for (i, &width) in channels.iter().enumerate() {
                    problems.check_range(
                        &format!("model.channels[{i}]"),
                        width,
                        1,
                        MAX_LAYER_WIDTH,
                    );
                }
            }
            _ => {}
        }
        let parameters = self.parameter_count(28, CLASSES);
        // A transformer's size is checked with its own shape (`layout`).
        if self.kind != ModelKind::Transformer && parameters > MAX_PARAMETERS {
            problems.push(
                "model",
                format!("{parameters} parameters, expected at most {MAX_PARAMETERS}"),
            );
        }
    }
}

/// Which data set `[data]` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DatasetKind {
    /// Zalando's Fashion-MNIST: 60,000 training and 10,000 test images of 28 x 28 pixels.
    #[default]
    #[serde(rename = "fashion-mnist")]
    FashionMnist,
    /// The complete works of Shakespeare as one text (about 5 MB), for character-level
    /// language models; the last 10% is the validation split.
    #[serde(rename = "shakespeare")]
    Shakespeare,
}

/// `[data]`: where the data set is and how it is read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSpec {
    /// The data set: `"fashion-mnist"` or `"shakespeare"`. Default `"fashion-mnist"`.
    pub dataset: DatasetKind,
    /// Directory holding the data set's files (Fashion-MNIST's gzipped IDX files, or
    /// `shakespeare.txt`). When given it is the only place looked; otherwise the rank searches
    /// the data set's usual places (see the README). Default: absent.
    pub path: Option<String>,
    /// Seed of the per-epoch shuffle, the same on every rank. Default 0.
    pub seed: u64,
    /// Whether each data-parallel rank records the training examples it takes at every step
    /// (their indices in the training split), in
    /// `<output dir>/samples/attempt-<A>.rank-<R>.txt`, one line `STEP INDEX,INDEX,...` per
    /// step: to audit the data order, e.g. across restarts. Default false.
    pub record_samples: bool,
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            dataset: DatasetKind::FashionMnist,
            path: None,
            seed: 0,
            record_samples: false,
        }
    }
}

impl DataSpec {
    fn validate(&self, problems: &mut Problems) {
        if let Some(path) = &self.path {
            check_path("data.path", path, problems);
        }
    }
}

/// `[optimizer]`: the optimizer and its hyper-parameters. Fields that belong to one kind only
/// are refused for the other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerSpec {
    /// Update rule: `"sgd"` or `"adamw"`. Default `"adamw"`.
    pub kind: OptimizerKind,
    /// Peak learning rate (reached after warmup). Default 0.1 for SGD, 0.001 for AdamW.
    pub lr: Option<f64>,
    /// SGD momentum factor, 0 to below 1 (0 disables momentum). Default 0.9; SGD only.
    pub momentum: Option<f64>,
    /// AdamW decay rates of the first and second moment estimates. Default `[0.9, 0.999]`;
    /// AdamW only.
    pub betas: Option<[f64; 2]>,
    /// AdamW term added to the denominator for stability. Default 1e-8; AdamW only.
    pub eps: Option<f64>,
    /// Weight decay: L2 penalty added to the gradient for SGD, decoupled decay for AdamW.
    /// Default 0 for SGD, 0.01 for AdamW.
    pub weight_decay: Option<f64>,
    /// Rescales the averaged gradients so that their global L2 norm is at most this value.
    /// Default: no clipping.
    pub grad_clip_norm: Option<f64>,
}

impl OptimizerSpec {
    /// Returns the peak learning rate, applying the kind's default.
    pub fn learning_rate(&self) -> f64 {
        self.lr.unwrap_or(match self.kind {
            OptimizerKind::Sgd => 0.1,
            OptimizerKind::Adamw => 0.001,
        })
    }

    /// Returns the SGD momentum factor (0.9 unless given).
    pub fn momentum(&self) -> f64 {
        self.momentum.unwrap_or(0.9)
    }

    /// Returns the AdamW betas (`[0.9, 0.999]` unless given).
    pub fn betas(&self) -> [f64; 2] {
        self.betas.unwrap_or([0.9, 0.999])
    }

    /// Returns the AdamW epsilon (1e-8 unless given).
    pub fn eps(&self) -> f64 {
        self.eps.unwrap_or(1e-8)
    }

    /// Returns the weight decay, applying the kind's default.
    pub fn weight_decay(&self) -> f64 {
        self.weight_decay.unwrap_or(match self.kind {
            OptimizerKind::Sgd => 0.0,
            OptimizerKind::Adamw => 0.01,
        })
    }

    /// Returns the hyper-parameters with every default applied, as the update rules take them
    /// (on a training rank or a parameter server alike).
    pub fn config(&self) -> OptimizerConfig {
        let [beta1, beta2] = self.betas();
        OptimizerConfig {
            kind: self.kind,
            learning_rate: self.learning_rate(),
            momentum: self.momentum(),
            beta1,
            beta2,
            eps: self.eps(),
            weight_decay: self.weight_decay(),
        }
    }

    fn validate(&self, problems: &mut Problems) {
        let learning_rate = self.learning_rate();
        if !(learning_rate.is_finite() && learning_rate > 0.0 && learning_rate <= MAX_LEARNING_RATE)
        {
            problems.push(
                "optimizer.lr",
                format!("{learning_rate}, expected above 0 and at most {MAX_LEARNING_RATE}"),
            );
        }
        let weight_decay = self.weight_decay();
        if !(weight_decay.is_finite() && (0.0..=1.0).contains(&weight_decay)) {
            problems.push(
                "optimizer.weight_decay",
                format!("{weight_decay}, expected 0 to 1"),
            );
        }
        if let Some(norm) = self.grad_clip_norm
            && !(norm.is_finite() && norm > 0.0)
        {
            problems.push(
                "optimizer.grad_clip_norm",
                format!("{norm}, expected a finite value above 0"),
            );
        }
        match self.kind {
            OptimizerKind::Sgd => {
                for (field, present) in
                    [("betas", self.betas.is_some()), ("eps", self.eps.is_some())]
                {
                    if present {
                        problems.push(
                            format!("optimizer.{field}"),
                            "only allowed with kind = \"adamw\"",
                        );
                    }
                }
                let momentum = self.momentum();
                if !(momentum.is_finite() && (0.0..1.0).contains(&momentum)) {
                    problems.push(
                        "optimizer.momentum",
                        format!("{momentum}, expected 0 to below 1"),
                    );
                }
            }
            OptimizerKind::Adamw => {
                if self.momentum.is_some() {
                    problems.push("optimizer.momentum", "only allowed with kind = \"sgd\"");
                }
                for (i, beta) in self.betas().into_iter().enumerate() {
                    if !(beta.is_finite() && (0.0..1.0).contains(&beta)) {
                        problems.push(
                            format!("optimizer.betas[{i}]"),
                            format!("{beta}, expected 0 to below 1"),
                        );
                    }
                }
                let eps = self.eps();
                if !(eps.is_finite() && eps > 0.0 && eps <= 1.0) {
                    problems.push(
                        "optimizer.eps",
                        format!("{eps}, expected above 0 and at most 1"),
                    );
                }
            }
        }
    }
}

/// `[schedule]`: epochs, batch size, learning-rate warmup and decay. Evaluation on the test
/// split runs at the end of every epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Passes over the training split (1 to 10,000). An epoch is `floor(examples / batch_size)`
    /// steps; the incomplete last batch is dropped, a different one each epoch. Default 1.
    pub epochs: u32,
    /// Global batch: examples per optimizer step summed over all data-parallel ranks
    /// (1 to 65,536, and at least `parallel.data`). Default 256.
    pub batch_size: u32,
    /// Steps over which the learning rate rises linearly from `lr / warmup_steps` to `lr`.
    /// Default 0 (no warmup).
    pub warmup_steps: u64,
    /// Decay after warmup: `"cosine"` or `"constant"`. Default `"cosine"`.
    pub lr_decay: LearningRateDecay,
    /// Stops after this many optimizer steps even if epochs remain; the cosine decay then
    /// ends here. Default: no limit.
    pub max_steps: Option<u64>,
    /// Also evaluates every this many steps (1 to 1,000,000,000). Default: only at the end of
    /// every epoch and of training.
    pub eval_every_steps: Option<u64>,
    /// Ends the run after this many optimizer steps (1 to 1,000,000,000; capped at the run's
    /// steps) with an evaluation and a checkpoint of that step. Epochs, learning-rate schedule
    /// and total steps stay those of the whole run, so a run resuming from that checkpoint
    /// continues exactly where this one stopped (a sweep pauses its trials at a rung this way).
    /// Not with `stop_after_epochs`. Default: absent, the run goes to its end.
    pub stop_after_steps: Option<u64>,
    /// `stop_after_steps` in epochs: above 0 and at most `epochs`, fractions allowed; the run
    /// ends after `ceil(stop_after_epochs x steps per epoch)` steps, at least 1. Default: absent.
    pub stop_after_epochs: Option<f64>,
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 256,
            warmup_steps: 0,
            lr_decay: LearningRateDecay::Cosine,
            max_steps: None,
            eval_every_steps: None,
            stop_after_steps: None,
            stop_after_epochs: None,
        }
    }
}

impl ScheduleSpec {
    fn validate(&self, world_size: u32, problems: &mut Problems) {
        problems.check_range("schedule.epochs", self.epochs, 1, MAX_EPOCHS);
        problems.check_range("schedule.batch_size", self.batch_size, 1, MAX_BATCH_SIZE);
        if self.batch_size < world_size {
            problems.push(
                "schedule.batch_size",
                format!(
                    "{}, expected at least parallel.data = {world_size} (one example per rank)",
                    self.batch_size
                ),
            );
        }
        problems.check_range("schedule.warmup_steps", self.warmup_steps, 0, MAX_STEPS);
        if let Some(max_steps) = self.max_steps {
            problems.check_range("schedule.max_steps", max_steps, 1, MAX_STEPS);
        }
        if let Some(every) = self.eval_every_steps {
            problems.check_range("schedule.eval_every_steps", every, 1, MAX_STEPS);
        }
    }
}

pub(crate) fn check_path(path: &str, value: &str, problems: &mut Problems) {
    if value.is_empty() {
        problems.push(path, "empty, expected a path");
    }
    if value.len() > MAX_STRING_LEN {
        problems.push(
            path,
            format!("{} bytes, expected at most {MAX_STRING_LEN}", value.len()),
        );
    }
    if value.contains('\0') {
        problems.push(path, "contains a NUL byte");
    }
}

/// Records every problem of the training sections of `spec` (absent sections take their
/// defaults, which are valid).
pub fn validate(spec: &JobSpec, problems: &mut Problems) {
    let parallel = spec.parallel.clone().unwrap_or_default();
    parallel.validate(problems);
    if let Some(model) = &spec.model {
        model.validate(problems);
    }
    if let Some(data) = &spec.data {
        data.validate(problems);
        let transformer = spec
            .model
            .as_ref()
            .is_some_and(|model| model.kind == ModelKind::Transformer);
        if data.record_samples && (transformer || parallel.comm == Communication::Ps) {
            problems.push(
                "data.record_samples",
                "only for data-parallel image-model jobs (comm = \"allreduce\", not the \
                 transformer)",
            );
        }
    }
    if let Some(optimizer) = &spec.optimizer {
        optimizer.validate(problems);
    }
    spec.schedule
        .clone()
        .unwrap_or_default()
        .validate(parallel.data, problems);
    if let Some(checkpoint) = &spec.checkpoint {
        checkpoint.validate(problems);
    }
    if let Some(train) = &spec.train {
        train.validate(problems);
    }
    crate::early_stopping::validate(spec, &parallel, problems);
    crate::layout::validate(spec, &parallel, problems);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;
    use crate::problems::problem_strings;

    #[test]
    fn a_training_job_sets_its_stop_grace_in_its_checkpoint_section() {
        let with = |grace: &str| {
            parse(&format!(
                "version = 1\nkind = \"train\"\n[checkpoint]\nstop_grace_s = {grace}\n"
            ))
        };
        assert_eq!(with("45.5").unwrap().stop_grace_s(), 45.5);
        assert_eq!(
            parse("version = 1\nkind = \"train\"\n")
                .unwrap()
                .stop_grace_s(),
            10.0
        );
        for bad in ["601", "-1", "nan"] {
            let error = with(bad).unwrap_err().to_string();
            assert!(error.contains("checkpoint.stop_grace_s"), "{bad}: {error}");
        }
    }

    #[test]
    fn samples_are_recorded_by_data_parallel_image_models_only() {
        let with = |extra: &str| {
            parse(&format!(
                "version = 1\nkind = \"train\"\n[data]\nrecord_samples = true\n{extra}"
            ))
        };
        assert!(with("").unwrap().data.unwrap().record_samples);
        let error = with("[parallel]\ndata = 2\ncomm = \"ps\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("data.record_samples: only for"), "{error}");
    }

    #[test]
    fn bare_train_job_takes_every_default() {
        let spec = parse("version = 1\nkind = \"train\"\n").unwrap();
        assert_eq!(spec.ranks(), 1);
        assert!(spec.model.is_none());
        let optimizer = OptimizerSpec::default();
        assert_eq!(optimizer.kind, OptimizerKind::Adamw);
        assert_eq!(optimizer.learning_rate(), 0.001);
        assert_eq!(optimizer.weight_decay(), 0.01);
        assert_eq!(ModelSpec::default().hidden, vec![512, 256]);
        assert_eq!(
            ParallelSpec::default().gradient_bucket_bytes,
            25 * 1024 * 1024
        );
    }

    #[test]
    fn full_demo_job_parses() {
        let text = r#"
version = 1
name = "fashion-mlp-dp"
kind = "train"
[model]
kind = "mlp"
hidden = [512, 256]
seed = 7
[data]
dataset = "fashion-mnist"
path = "/data/fashion-mnist"
seed = 3
[optimizer]
kind = "adamw"
lr = 0.002
betas = [0.9, 0.99]
eps = 1e-7
weight_decay = 0.05
grad_clip_norm = 1.0
[schedule]
epochs = 10
batch_size = 256
warmup_steps = 100
lr_decay = "cosine"
max_steps = 5000
[parallel]
data = 4
gradient_bucket_bytes = 1048576
[checkpoint]
every_steps = 500
resume_from = "/runs/old/step-00000500"
directory = "out"
"#;
        let spec = parse(text).unwrap();
        assert_eq!(spec.ranks(), 4);
        let optimizer = spec.optimizer.unwrap();
        assert_eq!(optimizer.betas(), [0.9, 0.99]);
        assert_eq!(optimizer.learning_rate(), 0.002);
        assert_eq!(spec.schedule.unwrap().max_steps, Some(5000));
        assert_eq!(spec.model.unwrap().seed, 7);
        assert_eq!(spec.checkpoint.unwrap().directory, "out");
    }

    #[test]
    fn the_checkpoint_directory_stays_inside_the_output_directory() {
        let with_directory =
            |directory: &str| format!("version = 1\nkind = \"train\"\n[checkpoint]\n{directory}\n");
        let problems = problem_strings(&with_directory("directory = \"/etc/cron.d\""));
        assert_eq!(
            problems,
            [
                "checkpoint.directory: \"/etc/cron.d\" is absolute, expected a path relative to the \
              job's output directory"
            ]
        );
        for escape in ["../other-job", "runs/../../x", "a/.."] {
            let problems = problem_strings(&with_directory(&format!("directory = \"{escape}\"")));
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(
                problems[0]
                    .starts_with(&format!("checkpoint.directory: \"{escape}\" has a \"..\"")),
                "{problems:?}"
            );
        }
        for inside in ["checkpoints", "./runs/a", "a/b/", "."] {
            let spec = parse(&with_directory(&format!("directory = \"{inside}\""))).unwrap();
            assert_eq!(spec.checkpoint.unwrap().directory, inside);
        }
        // Resuming from another job's checkpoint and a shared data set stay possible.
        parse(&with_directory(
            "resume_from = \"/runs/old/step-00000500\"\n[data]\npath = \"/data/fashion\"",
        ))
        .unwrap();
        parse(&with_directory(
            "resume_from = \"../other/checkpoints/step-00000500\"",
        ))
        .unwrap();
    }

    #[test]
    fn sgd_defaults_differ_from_adamw() {
        let spec = parse("version = 1\nkind = \"train\"\n[optimizer]\nkind = \"sgd\"\n").unwrap();
        let optimizer = spec.optimizer.unwrap();
        assert_eq!(optimizer.learning_rate(), 0.1);
        assert_eq!(optimizer.momentum(), 0.9);
        assert_eq!(optimizer.weight_decay(), 0.0);
    }

    #[test]
    fn optimizer_config_carries_every_default_and_every_given_value() {
        let spec = parse(
            "version = 1\nkind = \"train\"\n[optimizer]\nkind = \"adamw\"\nbetas = [0.8, 0.95]\n",
        )
        .unwrap();
        let config = spec.optimizer.unwrap().config();
        assert_eq!(
            config,
            OptimizerConfig {
                kind: OptimizerKind::Adamw,
                learning_rate: 0.001,
                momentum: 0.9,
                beta1: 0.8,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.01,
            }
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
version = 1
kind = "train"
[model]
kind = "mlp"
hidden = [0, 70000]
channels = [8]
[optimizer]
kind = "sgd"
lr = -1.0
momentum = 1.5
betas = [0.9, 0.999]
weight_decay = 2.0
grad_clip_norm = 0.0
[schedule]
epochs = 0
batch_size = 1000000000
warmup_steps = 2000000000
max_steps = 0
[parallel]
data = 0
gradient_bucket_bytes = 10
[checkpoint]
every_steps = 0
directory = ""
"#;
        let problems = problem_strings(text);
        for path in [
            "model.hidden[0]",
            "model.hidden[1]",
            "model.channels",
            "optimizer.lr",
            "optimizer.momentum",
            "optimizer.betas",
            "optimizer.weight_decay",
            "optimizer.grad_clip_norm",
            "schedule.epochs",
            "schedule.batch_size",
            "schedule.warmup_steps",
            "schedule.max_steps",
            "parallel.data",
            "parallel.gradient_bucket_bytes",
            "checkpoint.every_steps",
            "checkpoint.directory",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(path)),
                "{path} not in {problems:?}"
            );
        }
    }

    #[test]
    fn adamw_refuses_sgd_fields_and_bad_betas() {
        let text = "version = 1\nkind = \"train\"\n[optimizer]\nmomentum = 0.9\nbetas = [1.0, \
                    0.5]\neps = 0.0\n";
        let problems = problem_strings(text);
        for path in ["optimizer.momentum", "optimizer.betas[0]", "optimizer.eps"] {
            assert!(
                problems.iter().any(|p| p.starts_with(path)),
                "{path} not in {problems:?}"
            );
        }
        assert!(!problems.iter().any(|p| p.starts_with("optimizer.betas[1]")));
    }

    #[test]
    fn batch_smaller_than_world_is_refused() {
        let text = "version = 1\nkind = \"train\"\n[parallel]\ndata = 8\n[schedule]\nbatch_size \
                    = 4\n";
        let problems = problem_strings(text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("parallel.data = 8"), "{problems:?}");
    }

    #[test]
    fn oversized_model_is_refused() {
        let text = "version = 1\nkind = \"train\"\n[model]\nhidden = [65536, 65536, 65536]\n";
        let problems = problem_strings(text);
        assert!(
            problems.iter().any(|p| p.starts_with("model:")),
            "{problems:?}"
        );
    }

    #[test]
    fn parameter_count_matches_hand_count() {
        let mlp = ModelSpec::default();
        assert_eq!(
            mlp.parameter_count(28, 10),
            784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10
        );
        let cnn = ModelSpec {
            kind: ModelKind::Cnn,
            hidden: vec![64],
            channels: Some(vec![8, 16]),
            ..ModelSpec::default()
        };
        let convolutions = (8 * 9 + 8) + (16 * 8 * 9 + 16);
        let dense = (16 * 7 * 7 * 64 + 64) + (64 * 10 + 10);
        assert_eq!(cnn.parameter_count(28, 10), convolutions + dense);
    }

    #[test]
    fn unknown_train_field_is_named() {
        let problems = problem_strings("version = 1\nkind = \"train\"\n[schedule]\nbatch = 4\n");
        assert!(problems[0].starts_with("schedule"), "{problems:?}");
        assert!(problems[0].contains("batch"), "{problems:?}");
    }

    #[test]
    fn cnn_channels_are_bounded() {
        let text = "version = 1\nkind = \"train\"\n[model]\nkind = \"cnn\"\nchannels = [1, 2, \
                    3, 4, 5]\n";
        let problems = problem_strings(text);
        assert!(
            problems.iter().any(|p| p.starts_with("model.channels")),
            "{problems:?}"
        );
    }

    #[test]
    fn parameter_server_job_runs_its_servers_after_its_ranks() {
        let text = "version = 1\nkind = \"train\"\n[parallel]\ndata = 4\ncomm = \"ps\"\n\
                    ps_shards = 2\nps_mode = \"ssp\"\nstaleness = 3\n";
        let spec = parse(text).unwrap();
        let parallel = spec.parallel.clone().unwrap();
        assert_eq!(spec.ranks(), 4);
        assert_eq!(spec.processes(), 6);
        assert_eq!(parallel.ps_mode(), PsMode::Ssp);
        assert_eq!(parallel.staleness(), 3);
        let defaults = parse("version = 1\nkind = \"train\"\n[parallel]\ncomm = \"ps\"\n")
            .unwrap()
            .parallel
            .unwrap();
        assert_eq!(defaults.server_count(), 1);
        assert_eq!(defaults.ps_mode(), PsMode::Sync);
        assert_eq!(
            parse("version = 1\nkind = \"train\"\n")
                .unwrap()
                .processes(),
            1
        );
    }

    #[test]
    fn parameter_server_fields_are_refused_where_they_do_not_apply() {
        let problems = problem_strings(
            "version = 1\nkind = \"train\"\n[parallel]\nps_shards = 2\nstaleness = 1\n",
        );
        assert!(
            problems.iter().any(|p| p.starts_with("parallel.ps_shards")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.starts_with("parallel.staleness")),
            "{problems:?}"
        );
        let problems = problem_strings(
            "version = 1\nkind = \"train\"\n[parallel]\ncomm = \"ps\"\nps_mode = \"async\"\n\
             staleness = 1\n",
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("parallel.staleness") && p.contains("ssp")),
            "{problems:?}"
        );
        let problems = problem_strings(
            "version = 1\nkind = \"train\"\n[parallel]\ncomm = \"ps\"\nps_shards = 0\n\
             [optimizer]\ngrad_clip_norm = 1.0\n",
        );
        assert!(
            problems.iter().any(|p| p.starts_with("parallel.ps_shards")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("optimizer.grad_clip_norm")),
            "{problems:?}"
        );
        let problems = problem_strings(
            "version = 1\nkind = \"train\"\n[resources]\ndevice = \"gpu\"\n[parallel]\n\
             comm = \"ps\"\n",
        );
        assert!(
            problems.iter().any(|p| p.starts_with("resources.device")),
            "{problems:?}"
        );
        let problems =
            problem_strings("version = 1\nkind = \"train\"\n[parallel]\ncomm = \"gossip\"\n");
        assert!(
            problems.iter().any(|p| p.starts_with("parallel.comm")),
            "{problems:?}"
        );
    }

    #[test]
    fn embedding_model_fields_belong_to_the_embedding_kind() {
        let spec = parse(
            "version = 1\nkind = \"train\"\n[model]\nkind = \"embedding\"\nhidden = [64]\n\
             intensity_levels = 4\n",
        )
        .unwrap();
        let model = spec.model.unwrap();
        assert_eq!(model.embedding_width(), DEFAULT_EMBEDDING_WIDTH);
        assert_eq!(model.embedding_rows(784), 784 * 3);
        assert_eq!(
            model.parameter_count(28, CLASSES),
            784 * 3 * 32 + (32 * 64 + 64) + (64 * 10 + 10)
        );
        let problems =
            problem_strings("version = 1\nkind = \"train\"\n[model]\nembedding_width = 8\n");
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("model.embedding_width")),
            "{problems:?}"
        );
        let problems = problem_strings(
            "version = 1\nkind = \"train\"\n[model]\nkind = \"embedding\"\n\
             intensity_levels = 1\n",
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("model.intensity_levels")),
            "{problems:?}"
        );
    }
}
