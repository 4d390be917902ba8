//! Job files the training tests submit.

/// A `kind = "train"` job of the demo MLP (784-512-256-10, AdamW at `lr`, batch 256, 50 warm-up
/// steps, cosine decay) on `ranks` data-parallel ranks, with `parallel_extra` appended to its
/// `[parallel]` section. Fashion-MNIST must be installed (`scripts/setup.sh` installs
/// `dataset-fashion-mnist`); the ranks find it in /usr/share/datasets/fashion-mnist or
/// `$COHORT_DATA`.
pub fn mlp_job(
    name: &str,
    ranks: u32,
    epochs: u32,
    max_steps: Option<u64>,
    lr: f64,
    parallel_extra: &str,
) -> String {
    let max_steps = max_steps.map_or(String::new(), |steps| format!("max_steps = {steps}"));
    format!(
        r#"
version = 1
name = "{name}"
kind = "train"
[model]
kind = "mlp"
hidden = [512, 256]
[optimizer]
kind = "adamw"
lr = {lr}
[schedule]
epochs = {epochs}
batch_size = 256
warmup_steps = 50
lr_decay = "cosine"
{max_steps}
[parallel]
data = {ranks}
{parallel_extra}
"#
    )
}
